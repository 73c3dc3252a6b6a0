"""A preprocessed split read from its Parquet files a piece at a time.

The driver streams a split (the gate and compression evaluate on it) or samples it
(calibration rows, the replay of a retrain) and never holds it whole: what it holds is one
stream batch, or the sample plus one row group.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import StageError
from lepton_ray.runtime.uri import files as list_files
from lepton_ray.runtime.uri import is_dir, open_parquet

STREAM_ROWS = 1024  # rows per frame when a split is streamed


class SplitRows:
    """The Parquet files of one split, with the row count their footers give."""

    def __init__(self, files: Sequence[Path | str], columns: Sequence[str] | None = None):
        self.files = list(files)  # local paths, or object-store URIs
        self.columns = list(columns) if columns else None
        # Footers only: no row is read until the split is iterated or sampled.
        self.group_rows = []
        for path in self.files:
            with open_parquet(path) as reader:
                meta = reader.metadata
                self.group_rows.append(
                    [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                )

    def __len__(self) -> int:
        return sum(sum(groups) for groups in self.group_rows)

    def __iter__(self) -> Iterator:
        """Pandas frames of at most ``STREAM_ROWS`` rows, in file and row order."""
        for path in self.files:
            # No pre-buffering: by default Arrow reads a file's column chunks ahead, so what
            # it holds grows with the file, not with the batch.
            with open_parquet(path, pre_buffer=False, buffer_size=1 << 20) as reader:
                for batch in reader.iter_batches(batch_size=STREAM_ROWS, columns=self.columns):
                    yield batch.to_pandas()

    def frame(self):
        """The whole split as one frame: only for what is small by construction."""
        import pandas as pd

        return pd.concat(list(self), ignore_index=True)

    def sample_tables(self, rows: int, seed: int) -> Iterator:
        """Arrow tables holding ``rows`` rows drawn without replacement (``seed``), in file and
        row order (all rows when there are fewer). Only the row groups holding a drawn row
        are read, one at a time, and only the drawn rows of each are kept. The draw depends
        only on the seed and the row count, so the same files give the same rows."""
        import numpy as np
        import pyarrow as pa

        starts = np.cumsum([0] + [n for groups in self.group_rows for n in groups])
        total = int(starts[-1])
        chosen = np.sort(
            np.random.default_rng(seed).choice(total, size=min(rows, total), replace=False)
        )
        index = 0
        for path, groups in zip(self.files, self.group_rows, strict=True):
            wanted = []
            for group in range(len(groups)):
                lo, hi = np.searchsorted(chosen, starts[index : index + 2])
                if lo < hi:
                    wanted.append((group, chosen[lo:hi] - starts[index]))
                index += 1
            if wanted:
                with open_parquet(path) as reader:
                    for group, offsets in wanted:
                        table = reader.read_row_group(group, columns=self.columns)
                        yield table.take(pa.array(offsets))

    def sample(self, rows: int, seed: int):
        """``sample_tables`` as one pandas frame; None when the split has no rows."""
        import pyarrow as pa

        pieces = list(self.sample_tables(rows, seed))
        return pa.concat_tables(pieces).to_pandas() if pieces else None


def open_split(
    cfg: ExperimentConfig, split: str, columns: Sequence[str] | None = None
) -> SplitRows | None:
    """A preprocessed split of ``cfg``, or None when preprocessing left it empty.

    Never an empty split for one that should have rows: a folder the manifest counts rows
    for but that is missing or short (another node's disk, a half-copied store) is an error.
    """
    from lepton_ray.data.preprocess import MANIFEST, load_manifest

    expected = int(load_manifest(cfg).get("splits", {}).get(split, 0))
    if expected == 0:
        return None
    folder = cfg.data_dir / split
    if not is_dir(folder):
        raise StageError(
            f"the {split} split is missing at {folder} although {cfg.data_dir / MANIFEST} "
            f"counts {expected} rows; is cluster.storage_path shared by every node? Run "
            "`lepton-ray preprocess --force` on this config to rebuild it"
        )
    rows = SplitRows(list_files(folder, ".parquet", recursive=False), columns)
    if len(rows) != expected:
        raise StageError(
            f"the {split} split at {folder} holds {len(rows)} rows but the manifest counts "
            f"{expected}; run `lepton-ray preprocess --force` on this config to rebuild it"
        )
    return rows


def read_split_frame(cfg: ExperimentConfig, split: str, columns: Sequence[str] | None = None):
    """A small preprocessed split as one DataFrame, or None when preprocessing made it empty."""
    rows = open_split(cfg, split, columns)
    return None if rows is None else rows.frame()
