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

__all__ = ["ConfigError", "UserError", "config_dir", "check_fields", "check_overrides", "run_app", "fail"]

GROUPS = ("modality", "encoder", "masking", "objective", "data", "optim", "trainer", "logger", "callbacks", "experiment")


class ConfigError(ValueError):
    """A configuration mistake the user can fix; printed as one line."""


class UserError(RuntimeError):
    """A runtime condition the user can fix (missing data, collapse, ...); printed as one line."""


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


def fail(message: str, prog: str = "d2v", code: int = 2) -> None:
    """Print ``prog: error: message`` (one line) to stderr and exit with ``code``."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
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
    overrides: Sequence[str], config_name: str, validate: Optional[Callable[[Any], None]] = None
) -> Optional[str]:
    """Compose ``config_name`` with ``overrides`` and run ``validate`` on it; returns None when all is
    well, else a one-line message."""
    try:
        cfg = _compose(overrides, config_name)
        if validate is not None:
            validate(cfg)
    except ConfigError as e:
        return str(e)
    except Exception as e:  # hydra / omegaconf errors
        return explain(e, overrides, config_name, validate)
    return None


def run_app(
    task: Callable[[Any], Any],
    config_name: str,
    prog: str,
    validate: Optional[Callable[[Any], None]] = None,
    argv: Optional[Iterable[str]] = None,
) -> Any:
    """Run ``task(cfg)`` as a Hydra app on ``sys.argv`` (or ``argv``) after the override pre-check."""
    import hydra

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    overrides, checkable = _split_flags(sys.argv[1:])
    if checkable:
        problem = check_overrides(overrides, config_name, validate)
        if problem:
            fail(problem, prog)

    def wrapped(cfg: Any) -> Any:
        try:
            if validate is not None:
                validate(cfg)
            return task(cfg)
        except (ConfigError, UserError) as e:
            fail(str(e), prog, 2 if isinstance(e, ConfigError) else 3)

    app = hydra.main(config_path=config_dir(), config_name=config_name, version_base="1.3")(wrapped)
    return app()
