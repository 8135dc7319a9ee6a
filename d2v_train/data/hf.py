"""Local Hugging Face `datasets` input: a `save_to_disk` directory or local data files. Never a hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2v_train.data.common import DataError

# `load_dataset(<builder>, data_files=...)` builders for single local files.
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
VAL_SPLITS = ("validation", "valid", "val", "dev")


def is_saved_dataset(path: Path) -> bool:
    """True for a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and any(
        (path / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json")
    )


def is_hf_input(path: Path) -> bool:
    return is_saved_dataset(path) or (path.is_file() and path.suffix.lower() in FILE_BUILDERS)


def load_local(path: Path, train_split: str = "train") -> tuple[Any, Any | None]:
    """(train, validation-or-None) from a saved dataset dir or a local data file."""
    import datasets

    if is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path))
    if isinstance(ds, datasets.DatasetDict):
        if train_split not in ds:
            raise DataError(f"{path}: no split {train_split!r} (splits: {list(ds)}); set data.train_split")
        val = next((ds[s] for s in VAL_SPLITS if s in ds), None)
        return ds[train_split], val
    return ds, None


def require_column(ds: Any, column: str, path: Path, what: str) -> None:
    if column not in ds.column_names:
        raise DataError(
            f"{path}: no {what} column {column!r} (columns: {ds.column_names}); set data.{what}_column"
        )
