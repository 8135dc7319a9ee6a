"""What the console shows, and the run's log file holding the same.

Hydra configures Python logging for every entry point from ``configs/hydra/job_logging/d2v.yaml``:
one console handler (stdout) and one file handler (``<run dir>/<app>.log``, e.g. ``pretrain.log``),
both filtered by ``NoiseFilter``. This module supplies the pieces that YAML names:

- ``ConsoleFormatter``: the bare message for INFO, ``warning: ...`` / ``error: ...`` above; a Python
  warning shows as ``warning: <Category>: <text>`` without the file/line/source lines.
- ``NoiseFilter``: drops lines that are true on every run and tell the user nothing (Lightning's
  GPU/TPU/HPU availability lines, its product tip, "`Trainer.fit` stopped: `max_steps=N` reached").
- ``route_to_root()``: Lightning gives its loggers their own handler when imported before logging is
  configured; this sends them through ours instead, so they reach the log file once, and routes
  ``warnings.warn`` into logging (``logging.captureWarnings``) so warnings land in the log file too.
- ``quiet_warnings()``: warning filters for known-harmless library deprecations.
- ``log_to_file_only()``: a line (an error printed by ``cli.fail``) that the console already showed.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["ConsoleFormatter", "NoiseFilter", "log_to_file_only", "quiet_warnings", "route_to_root"]

# message starts of lines that carry no information for a user (matched after stripping whitespace)
NOISE = (
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "IPU available:",
    "💡 Tip:",
    "`Trainer.fit` stopped:",
    "You are using a CUDA device",
    "LOCAL_RANK:",
    "Initializing distributed:",
    "----------------------------------------------------------------------------------------------------",
    "distributed_backend=",
    "All distributed processes registered",
    "Trainer already configured with",
    "Restoring states from the checkpoint",  # our own line says where the run resumes from
    "Restored all states from the checkpoint",
)

# warnings that libraries raise on every run and that a user cannot act on
HARMLESS_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning on torch >= 2.10
    r".*module\(s\) in eval mode.*",  # the EMA teacher is in eval mode on purpose
    r".*find_unused_parameters=True was specified in DDP constructor.*",
    r".*val_dataloader.*no `validation_step`.*",  # pretraining without a validation step
)


class NoiseFilter(logging.Filter):
    """Drops the lines listed in ``NOISE``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage().lstrip()
        except Exception:  # noqa: BLE001 - a bad format string is not ours to judge here
            return True
        return not text.startswith(NOISE)


_WARNING_LINE = re.compile(r"^(?:.*?:\d+: )?(?P<body>.*)$", re.S)


def _warning_text(message: str) -> str:
    """``path:line: Category: text\\n  source`` -> ``Category: text`` (first line only)."""
    first = message.strip().splitlines()[0] if message.strip() else message
    m = _WARNING_LINE.match(first)
    return m.group("body").strip() if m else first


class ConsoleFormatter(logging.Formatter):
    """Bare messages; ``warning:`` / ``error:`` prefixes above INFO; python warnings on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == "py.warnings":
            message = _warning_text(message)
        if record.exc_info and record.levelno >= logging.ERROR:
            message = f"{message} ({record.exc_info[1]})"
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


class FileFormatter(logging.Formatter):
    """Timestamped lines for the log file; python warnings on one line, like the console."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s][%(name)s][%(levelname)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "py.warnings":
            record = logging.makeLogRecord({**record.__dict__, "msg": _warning_text(record.getMessage()), "args": None})
        return super().format(record)


def quiet_warnings() -> None:
    """Ignore the warnings in ``HARMLESS_WARNINGS`` (call before the libraries are used)."""
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def route_to_root() -> None:
    """Send Lightning's loggers and Python warnings through the root logger's handlers."""
    logging.captureWarnings(True)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
        lg.propagate = True


def log_to_file_only(line: str, level: int = logging.ERROR) -> None:
    """Write ``line`` to the root logger's file handlers only (the console has shown it already)."""
    record = logging.LogRecord("d2v_train", level, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
