"""A seeded sample of a preprocessed split, read from its Parquet row groups.

Only the row groups that hold a sampled row are read, one at a time, and only the sampled
rows of each are kept: the driver holds the sample plus one row group, however large the
split (reading the split whole to sample 256 calibration rows would hold all of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lepton_ray.config import ExperimentConfig
from lepton_ray.errors import StageError


def sample_parquet_rows(
    files: Sequence[Path], rows: int, seed: int, columns: Sequence[str] | None = None
):
    """``rows`` rows drawn without replacement (``seed``) from ``files`` as one pandas frame
    (None if none), in file and row order; all rows when there are fewer. Returns (frame,
    the number of rows in the files).

    The draw depends only on the seed and the row count, so the same files give the same rows.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Row counts from the footers; a file is opened to read rows only while it is read.
    sizes = [
        [m.row_group(g).num_rows for g in range(m.num_row_groups)]
        for m in map(pq.read_metadata, files)
    ]
    starts = np.cumsum([0] + [n for groups in sizes for n in groups])
    total = int(starts[-1])
    chosen = np.sort(
        np.random.default_rng(seed).choice(total, size=min(rows, total), replace=False)
    )
    pieces, index = [], 0
    for path, groups in zip(files, sizes, strict=True):
        wanted = []
        for group in range(len(groups)):
            lo, hi = np.searchsorted(chosen, starts[index : index + 2])
            if lo < hi:
                wanted.append((group, chosen[lo:hi] - starts[index]))
            index += 1
        if wanted:
            with pq.ParquetFile(path) as reader:
                for group, offsets in wanted:
                    table = reader.read_row_group(group, columns=list(columns) if columns else None)
                    pieces.append(table.take(pa.array(offsets)))
    return (pa.concat_tables(pieces).to_pandas() if pieces else None), total


def sample_split(
    cfg: ExperimentConfig, split: str, rows: int, seed: int, columns: Sequence[str] | None = None
):
    """``sample_parquet_rows`` of a preprocessed split; None when preprocessing left it empty.

    A split whose files hold another row count than the manifest's is an error, as in
    ``read_split_frame``.
    """
    from lepton_ray.data.pipeline import MANIFEST, load_manifest

    expected = int(load_manifest(cfg).get("splits", {}).get(split, 0))
    if expected == 0:
        return None
    folder = cfg.data_dir / split
    frame, total = sample_parquet_rows(sorted(folder.glob("*.parquet")), rows, seed, columns)
    if total != expected:
        raise StageError(
            f"the {split} split at {folder} holds {total} rows but {cfg.data_dir / MANIFEST} "
            f"counts {expected}; run `lepton-ray preprocess --force` on this config to rebuild it"
        )
    return frame
