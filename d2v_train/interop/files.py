"""Safe weight files: atomic writes, and loads that never execute pickled code."""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes through a temporary file (``.<name>.<random>.tmp``) in the same folder, fsyncs it,
    then renames it over ``path`` and fsyncs the folder.

    A crash mid-write leaves the previous file (if any) intact, never a truncated one. The file
    gets the mode a plain ``open()`` would give it (0666 less the umask): ``mkstemp`` creates
    0600 files, which others on a shared volume could not read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def current_umask() -> int:
    """The process umask: from ``/proc/self/status`` where Linux offers it (no side effect), else
    read by setting and restoring it (POSIX has no getter)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Makes the rename itself durable; skipped where the filesystem cannot fsync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors(state: Mapping[str, Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})}))


def save_json(data: Mapping[str, Any], path: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def load_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


ACCEPTED_SOURCES = (
    "a .ckpt written by d2v-pretrain or d2v-finetune, a fairseq / BEiT data2vec v1 or 2.0 .pt file, "
    "or a model directory with config.json (d2v-export or transformers)"
)


def not_a_torch_file(path: Path) -> Optional[str]:
    """Why ``path`` cannot be a PyTorch file (a zip archive since torch 1.6, a pickle before), or None.

    Checked from the first bytes before any unpickling, so a text or image file given as a checkpoint
    gets a sentence saying so instead of an unpickler's byte count or ``pop from empty list``."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    if not head:
        what = "an empty file"
    elif head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"fLaC", b"GIF8")):
        what = "an image or audio file"
    elif head.startswith(b"{"):
        what = "a JSON file"
    else:
        try:
            head.decode("utf-8")
            what = "a text file"
        except UnicodeDecodeError:
            what = "not a PyTorch file"
    return f"{path} is not a checkpoint ({what}); expected {ACCEPTED_SOURCES}"


def torch_load_safely(path: Path, map_location: Any = "cpu", kind: str = "file") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code.

    A file that needs more is refused with one line naming it and the object it tried to build,
    not a bare unpickling trace; ``kind`` names what the file is in that line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path}: no such file")
    problem = not_a_torch_file(path)
    if problem:
        raise ValueError(problem)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        match = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" (it references {match.group(1)})" if match else ""
        raise ValueError(
            f"refused to load {kind} {path}: it holds pickled objects beyond tensors and plain "
            f"containers{what}, and loading it could execute code"
        ) from None
    except Exception as err:  # truncated file, not a torch file, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot read {kind} {path}: {first}") from None


def load_weights(path: Path) -> dict[str, Tensor]:
    """Loads a ``.safetensors`` file, or a PyTorch pickle with ``weights_only=True``.

    A pickle that needs anything beyond tensors and plain containers is refused with a message,
    so a malicious checkpoint cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    state = torch_load_safely(path)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat mapping of names to tensors")
    return state


def check_state(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], where: str) -> None:
    """Raises naming the keys missing or unexpected in ``state`` and the first shape mismatch."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the model built from its config; "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{where}: {key} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[key].shape)}")
