"""Shared plumbing for d2v_train's Hydra entry points (``d2v-pretrain`` and friends).

- ``config_dir()``: where the YAML configs live (``$D2V_CONFIG_DIR``, the source checkout's
  ``configs/``, or ``d2v_train/configs`` when packaged).
- ``check_overrides()``: composes the command line once with Hydra's compose API *before* the app
  runs, so a wrong override exits with one line naming the key and its valid choices instead of
  Hydra's multi-line report.
- ``check_fields()``: validates a config node against a dataclass schema (unknown keys, bad types).
- ``run_app()``: runs a Hydra app with that pre-check and turns ``ConfigError`` / ``UserError``
  raised inside it into one-line messages.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

__all__ = ["ConfigError", "UserError", "Stopped", "config_dir", "check_fields", "check_overrides", "run_app", "fail"]

GROUPS = ("modality", "encoder", "masking", "objective", "data", "optim", "trainer", "logger", "callbacks", "experiment")


class ConfigError(ValueError):
    """A configuration mistake the user can fix; printed as one line."""


class UserError(RuntimeError):
    """A runtime condition the user can fix (unusable data, collapse, ...); printed as one line, exit 1."""

    exit_code = 1


class Stopped(UserError):
    """The run stopped on a signal after saving a checkpoint; exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def config_dir() -> str:
    """Absolute path of the config directory."""
    env = os.environ.get("D2V_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs", here / "configs"):
        if (cand / "pretrain.yaml").is_file():
            return str(cand)
    raise ConfigError(f"cannot find the configs directory (looked in {here.parent / 'configs'}); set D2V_CONFIG_DIR")


def fail(message: str, prog: str = "d2v", code: int = 2, kind: str = "error") -> None:
    """Print ``prog: error: message`` (one line) to stderr, copy it to the run's log file, and exit
    with ``code`` (2: the command needs changing; 1: the run failed; 128+N: stopped by signal N)."""
    line = f"{prog}: {kind + ': ' if kind else ''}{' '.join(str(message).split())}"
    print(line, file=sys.stderr, flush=True)
    from d2v_train.logs import log_to_file_only

    log_to_file_only(line)
    raise SystemExit(code)


# ------------------------------------------------------------------------------------------ schemas


def _type_ok(value: Any, default: Any) -> bool:
    if value is None or default is None:
        return True
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        return True  # an interpolation: checked again once resolved (e.g. by the dataclass that reads it)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig"
    if isinstance(default, dict):
        return isinstance(value, Mapping)
    return True


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_fields(node: Mapping[str, Any], schema: type, where: str) -> None:
    """Raise ``ConfigError`` when ``node`` has a key ``schema`` (a dataclass) lacks, or a value whose
    type does not match the field's default (int / float / bool / str / list)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            valid = ", ".join(sorted(k for k in fields if k != "extra"))
            raise ConfigError(f"unknown key '{where}.{key}'; valid keys: {valid}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        value = node[key]
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            check_fields(value, type(default), f"{where}.{key}")
            continue
        if not _type_ok(value, default):
            raise ConfigError(
                f"bad value for '{where}.{key}': {_describe(value)}, expected {type(default).__name__}"
            )


def check_trainer(node: Mapping[str, Any]) -> None:
    """Trainer keys must be Lightning ``Trainer`` arguments with values of the right kind."""
    from lightning import Trainer

    params = inspect.signature(Trainer.__init__).parameters
    for key, value in node.items():
        if key not in params or key in ("self", "callbacks", "logger", "plugins"):
            valid = ", ".join(sorted(k for k in params if k not in ("self", "callbacks", "logger", "plugins")))
            raise ConfigError(f"unknown key 'trainer.{key}' (not a Lightning Trainer argument); valid keys: {valid}")
        default = params[key].default
        if value is None or default is None or default is inspect.Parameter.empty:
            continue
        if isinstance(default, (bool, int, float)) and isinstance(value, str):
            raise ConfigError(f"bad value for 'trainer.{key}': {_describe(value)}, expected {type(default).__name__}")


def check_accelerator(node: Mapping[str, Any]) -> None:
    """A GPU accelerator on a machine where torch sees none: say so and how to run on CPU, instead of
    Lightning's ``No supported gpu backend found!``."""
    accelerator = str(node.get("accelerator") or "auto").lower()
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    if torch.cuda.is_available() or (accelerator == "gpu" and torch.backends.mps.is_available()):
        return
    raise ConfigError(
        f"trainer.accelerator={accelerator} but no GPU is visible (torch.cuda.is_available() is False; "
        "trainer=gpu, ddp, ddp_fp16 and ddp_bf16 need one): run on CPU with trainer=cpu (the default), "
        "or trainer=ddp_cpu to test DDP with 2 CPU processes"
    )


def check_data_path(cfg: Any) -> None:
    """``data.path`` / ``data.val_path`` that do not exist: one line before anything is built."""
    from omegaconf import OmegaConf

    _is_missing = OmegaConf.is_missing
    data = cfg.get("data")
    if data is None:
        return
    for key in ("path", "val_path"):
        if key not in data or _is_missing(data, key):
            continue
        value = data.get(key)
        if value in (None, "") or not isinstance(value, str) or "://" in value:
            continue
        if not Path(value).expanduser().exists():
            raise ConfigError(
                f"data.{key}={value} does not exist; set data.{key} to a folder, file, manifest or saved "
                "`datasets` directory"
            )


def check_launcher(argv: Sequence[str]) -> None:
    """``hydra/launcher=submitit_slurm`` without its plugin installed (Hydra: ``Unknown plugin class``)."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "hydra/launcher" and value == "submitit_slurm":
            import importlib.util

            try:
                found = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
            except ModuleNotFoundError:  # not even the hydra_plugins namespace
                found = False
            if not found:
                raise ConfigError(
                    "hydra/launcher=submitit_slurm needs the slurm extra: pip install 'd2v-train[slurm]' "
                    "(hydra-submitit-launcher), then run the same command"
                )


# ------------------------------------------------------------------------------------------ overrides


def _split_flags(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Overrides from argv, and whether a pre-check makes sense (not for sweeps, --help, -cp/-cn)."""
    overrides: list[str] = []
    skip_next = False
    checkable = True
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in ("-m", "--multirun", "--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc"):
            checkable = False
            continue
        if arg in ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"):
            checkable = False
            skip_next = True
            continue
        if arg in ("--cfg", "-c", "--package", "-p", "--experimental-rerun"):
            skip_next = True
            continue
        if arg.startswith("-"):
            continue
        overrides.append(arg)
    return overrides, checkable


def _node_keys(cfg: Any, path: str) -> list[str]:
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, path, throw_on_missing=False) if path else cfg
    if node is None or not OmegaConf.is_dict(node):
        return []
    return sorted(str(k) for k in node.keys())


def _group_options(group: str, message: str) -> list[str]:
    m = re.search(r"Available options in '([^']+)':\n((?:\t.*\n?)*)", message)
    if m:
        return [line.strip() for line in m.group(2).splitlines() if line.strip()]
    folder = Path(config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def explain(exc: BaseException, overrides: Sequence[str], config_name: str, validate: Optional[Callable[[Any], None]]) -> str:
    """One-line explanation of a composition / validation error."""
    msg = str(exc)
    cause = str(exc.__cause__) if exc.__cause__ else ""
    m = re.search(r"Could not find '([^']+)/([^'/]+)'", msg)
    if m:
        group, option = m.group(1), m.group(2)
        return f"unknown option '{option}' for '{group}'; valid choices: {', '.join(_group_options(group, msg))}"
    m = re.search(r"Could not (?:override|append to) '([^']+)'", msg)
    if m:
        key = m.group(1)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        rest = [o for o in overrides if not re.match(rf"^[+~]*{re.escape(key)}=", o)]
        try:
            cfg = _compose(rest, config_name)
            keys = _node_keys(cfg, parent)
        except Exception:
            keys = []
        if not parent:
            keys = sorted(set(keys) | set(GROUPS))
        why = "unknown key" if ("not in struct" in msg + cause or "No match" in msg) else "cannot set"
        if "No match in the defaults list" in msg:
            why = "unknown config group"
        hint = f"; valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(keys)}" if keys else ""
        return f"{why} '{key}'{hint} (use +{key}=... to add a new key)"
    m = re.search(r"Error parsing override '([^']+)'", msg)
    if m:
        return f"cannot parse override '{m.group(1)}': {msg.splitlines()[-1].strip()}"
    if "Missing mandatory value" in msg or "MissingMandatoryValue" in type(exc).__name__:
        key = getattr(exc, "full_key", None) or msg
        return f"missing value for '{key}': set it on the command line ({key}=...)"
    return msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__


def _compose(overrides: Sequence[str], config_name: str) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def check_overrides(
    overrides: Sequence[str], config_name: str, validate: Optional[Callable[[Any], None]] = None,
    environment: bool = True,
) -> Optional[str]:
    """Compose ``config_name`` with ``overrides`` and run ``validate`` on it; returns None when all is
    well, else a one-line message. ``environment``: also check this machine (a GPU for a GPU trainer,
    that ``data.path`` exists); off when the command only prints the config."""
    try:
        cfg = _compose(overrides, config_name)
        if validate is not None:
            validate(cfg)
        # this machine and its files, not the config's schema: checked on the command-line path only
        if environment and cfg.get("trainer") is not None:
            check_accelerator(cfg.trainer)
        if environment:
            check_data_path(cfg)
    except ConfigError as e:
        return str(e)
    except Exception as e:  # hydra / omegaconf errors
        return explain(e, overrides, config_name, validate)
    return None


def _header(config_name: str) -> list[str]:
    """The comment block at the top of ``<config_name>.yaml`` (what the app does, with examples)."""
    lines = []
    for line in (Path(config_dir()) / f"{config_name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return lines


def app_help(config_name: str, prog: str, hidden: Sequence[str] = ()) -> str:
    """``--help`` text: the config's header, then only the config groups this app composes (with their
    options and the default), then its other top-level settings.

    Hydra's own help lists every group in the config folder, which is shared by all entry points, so
    ``d2v-pretrain --help`` would offer fine-tuning heads; this reads the app's real defaults tree."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    choices = dict(cfg.hydra.runtime.choices)
    # "group@package" entries are picked by the config itself (modality_objective follows objective=)
    groups = [g for g in choices if not g.startswith("hydra/") and "@" not in g and g not in hidden] + ["hydra/launcher"]
    hidden_options = {h for h in hidden if ":" in h}  # "group:option" entries: options of another app
    out = [*_header(config_name), "", f"usage: {prog} [GROUP=OPTION ...] [KEY=VALUE ...] [-m] [--cfg job] [--hydra-help]", ""]
    out.append("config groups (GROUP=OPTION; default in brackets):")
    width = max(len(g) for g in groups)
    for g in sorted(groups, key=lambda g: (g.startswith("hydra/"), g)):
        folder = Path(config_dir()) / g
        options = sorted(q.stem for q in folder.glob("*.yaml")) if folder.is_dir() else []
        if g == "hydra/launcher":
            options = ["basic", *options]
        default = choices.get(g) or "none"
        shown = [o for o in options if o != default and f"{g}:{o}" not in hidden_options]
        out.append(f"  {g.ljust(width)}  [{default}] {', '.join(shown)}")
    plain = OmegaConf.to_container(cfg, resolve=False)
    scalars = [f"{k}={v}" for k, v in plain.items()  # type: ignore[union-attr]
               if k not in ("hydra", "run_dir", "modality") and not isinstance(v, (dict, list))]
    if scalars:
        out += ["", "other settings: " + ", ".join(scalars)]
    out += ["", f"Any key of the composed config can be set with KEY=VALUE ({prog} --cfg job prints it); "
            "-m runs a sweep over comma-separated values."]
    return "\n".join(out)


def run_app(
    task: Callable[[Any], Any],
    config_name: str,
    prog: str,
    validate: Optional[Callable[[Any], None]] = None,
    argv: Optional[Iterable[str]] = None,
    help_hidden: Optional[Sequence[str]] = None,
) -> Any:
    """Run ``task(cfg)`` as a Hydra app on ``sys.argv`` (or ``argv``) after the override pre-check.

    ``help_hidden``: when given, ``--help`` prints ``app_help`` (hiding these groups, and options given
    as ``group:option``) instead of Hydra's generic help."""
    import hydra

    from d2v_train.logs import quiet_warnings, route_to_root

    quiet_warnings()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if help_hidden is not None and any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(app_help(config_name, prog, help_hidden))
        raise SystemExit(0)
    overrides, checkable = _split_flags(sys.argv[1:])
    try:
        check_launcher(sys.argv[1:])
    except ConfigError as e:
        fail(str(e), prog)
    if checkable:
        prints_only = any(a in ("--cfg", "-c", "--info", "-i", "--resolve") for a in sys.argv[1:])
        problem = check_overrides(overrides, config_name, validate, environment=not prints_only)
        if problem:
            fail(problem, prog)

    def wrapped(cfg: Any) -> Any:
        route_to_root()  # Lightning's lines and python warnings reach the console and the log file once
        try:
            if validate is not None:
                validate(cfg)
            return task(cfg)
        except (ConfigError, UserError) as e:
            code = 2 if isinstance(e, ConfigError) else int(getattr(e, "exit_code", 1))
            fail(str(e), prog, code, kind="" if isinstance(e, Stopped) else "error")

    app = hydra.main(config_path=config_dir(), config_name=config_name, version_base="1.3")(wrapped)
    return app()
