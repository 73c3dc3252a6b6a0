"""Train without Ray: one process, or torchrun for DDP (NCCL on GPUs, gloo on CPUs).

    python -m lepton_ray.train.standalone experiments/quickstart.yaml --out outputs/standalone
    torchrun --nproc-per-node 2 -m lepton_ray.train.standalone CONFIG --out DIR

Reads the Parquet splits that ``lepton-ray preprocess`` wrote; writes the best checkpoint
(the same artifact format as a Ray run) and ``history.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any


def standalone_batch_rows(n_rows: int, cfg, epoch: int, rank: int, world: int):
    """Row indices of this rank's batches for one epoch: a seeded global shuffle per epoch,
    cut into equal shards (DDP's collectives stay in step)."""
    import numpy as np

    per_rank = n_rows // world
    order = np.random.default_rng(cfg.train.seed + epoch).permutation(n_rows)
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    for start in range(0, len(mine), cfg.train.batch_size):
        yield mine[start : start + cfg.train.batch_size]


def train_standalone(cfg, manifest: dict[str, Any], out: Path, log=print) -> dict[str, Any]:
    """Same recipe as a Ray Train worker, with torch.distributed set up from torchrun's env."""
    import pandas as pd
    import torch

    from lepton_ray.evaluation import collate
    from lepton_ray.train.recipe import setup_recipe, train_recipe

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available() and cfg.scaling.use_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    def wrap(model):
        model = model.to(device)
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    recipe = setup_recipe(cfg, manifest, world, wrap=wrap)
    frame = pd.read_parquet(cfg.data_dir / "train")
    pad_id = recipe.tokenizer.pad_token_id or 0

    def train_batches(epoch: int):
        for index in standalone_batch_rows(len(frame), cfg, epoch, rank, world):
            rows = frame.iloc[index]
            yield collate(list(rows["input_ids"]), list(rows["label_id"]), pad_id)

    out.mkdir(parents=True, exist_ok=True)

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        if folder is not None and metrics["improved"]:
            shutil.rmtree(out / "model", ignore_errors=True)
            shutil.copytree(folder, out / "model")

    state = train_recipe(recipe, train_batches, device, rank, world, report, log=log)
    if rank == 0:
        (out / "history.json").write_text(json.dumps(state.history, indent=2))
    if world > 1:
        torch.distributed.destroy_process_group()
    return {"history": state.history, "best": state.best, "model_dir": str(out / "model")}


def main() -> None:
    from lepton_ray.config import load_experiment
    from lepton_ray.data.pipeline import load_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    cfg = load_experiment(args.config, args.overrides)
    result = train_standalone(cfg, load_manifest(cfg), args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"best": result["best"], "model_dir": result["model_dir"]}))


if __name__ == "__main__":
    main()
