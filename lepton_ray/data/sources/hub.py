"""Hugging Face ``datasets``: a hub dataset, a local one, or one saved to disk."""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Any

from lepton_ray.config import DataConfig
from lepton_ray.data.sources.columns import check_columns
from lepton_ray.data.sources.common import Source, root_cause
from lepton_ray.data.sources.files import utf8_error
from lepton_ray.data.sources.locate import is_uri
from lepton_ray.errors import DataError


def _load_hf(cfg: DataConfig):
    import datasets

    hf = cfg.hf
    try:
        if _is_saved_dataset(hf.name):
            loaded = datasets.load_from_disk(hf.name)
            if isinstance(loaded, datasets.DatasetDict):
                if hf.split not in loaded:
                    raise DataError(
                        f"data.hf.split '{hf.split}' is not a split of {hf.name}; its splits "
                        f"are: {', '.join(loaded)}"
                    )
                loaded = loaded[hf.split]
            return loaded
        return datasets.load_dataset(hf.name, hf.config, split=hf.split, data_files=hf.data_files)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; one line names it
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError) and hf.data_files:
            for file in _local_data_files(hf.data_files):
                message = utf8_error(file)
                if "line" in message:
                    raise DataError(message) from None
        raise DataError(f"data.hf {cfg.source_name}: cannot load it: {root_cause(err)}") from None


def _is_saved_dataset(name: str) -> bool:
    folder = Path(name)
    return folder.is_dir() and any(
        (folder / marker).is_file() for marker in ("state.json", "dataset_dict.json")
    )


def _local_data_files(data_files: Any) -> list[str]:
    items = data_files.values() if isinstance(data_files, dict) else [data_files]
    flat = [f for item in items for f in ([item] if isinstance(item, str) else item)]
    return [f for pattern in flat if not is_uri(pattern) for f in sorted(glob.glob(pattern))]


def _hf_fingerprint(cfg: DataConfig, loaded) -> str:
    key = json.dumps([cfg.hf.model_dump(mode="json"), loaded._fingerprint], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _read_hf(cfg: DataConfig, required: list[tuple[str, list[str]]]) -> Source:
    loaded = _load_hf(cfg)
    check_columns(required, list(loaded.column_names), cfg.source_name)
    if len(loaded) == 0:
        raise DataError(f"data.hf {cfg.source_name}: the split holds no rows")
    return Source(
        ds=hf_to_ray(loaded, from_hub=_from_hub(cfg), max_rows=cfg.max_rows),
        n_rows=len(loaded),
        fingerprint=_hf_fingerprint(cfg, loaded),
    )


def _from_hub(cfg: DataConfig) -> bool:
    from datasets import config as hf_config
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    local = cfg.hf.name in _PACKAGED_DATASETS_MODULES or Path(cfg.hf.name).exists()
    return not local and not hf_config.HF_HUB_OFFLINE


HF_CHUNK_ROWS = 50_000
"""Rows of a local Hugging Face dataset put into the object store at a time."""


def hf_to_ray(loaded, from_hub: bool, max_rows: int | None = None, chunk_rows: int = HF_CHUNK_ROWS):
    """``ray.data.from_huggingface`` for a hub dataset (a distributed read of the hub's
    Parquet files where it has them); a local one goes straight to Arrow, which is what
    from_huggingface falls back to after probing the hub, a probe that reloads the builder
    without its data files and cannot work offline.

    A local dataset goes ``chunk_rows`` at a time (slices of its memory-mapped Arrow files)
    into the object store, its first ``max_rows`` rows only: the driver holds one chunk,
    never the split.
    """
    import ray
    import ray.data

    if from_hub:
        return ray.data.from_huggingface(loaded)
    table = loaded.with_format("arrow")
    rows = len(loaded) if max_rows is None else min(max_rows, len(loaded))
    refs = [
        ray.put(table[start : min(start + chunk_rows, rows)])
        for start in range(0, rows, chunk_rows)
    ]
    return ray.data.from_arrow_refs(refs)
