"""Train without Ray: one process, or torchrun for DDP (NCCL on GPUs, gloo on CPUs).

    python -m lepton_ray.train.standalone experiments/quickstart.yaml --out outputs/standalone
    torchrun --nproc-per-node 2 -m lepton_ray.train.standalone CONFIG --out DIR

Reads the Parquet splits that ``lepton-ray preprocess`` wrote; writes the best checkpoint
(the same artifact format as a Ray run) to ``--out/model``, the latest checkpoint to
``--out/last`` (resume with ``--set train.resume_from=DIR/last``) and ``history.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any


def train_standalone(cfg, manifest: dict[str, Any], out: Path, log=print) -> dict[str, Any]:
    """Same recipe as a Ray Train worker, with torch.distributed set up from torchrun's env."""
    import torch

    from lepton_ray.train.recipe import (
        fit_to_length,
        read_split,
        setup_recipe,
        train_recipe,
        training_rows,
    )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    use_cuda = torch.cuda.is_available() and cfg.scaling.use_gpu
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    # Every rank reads the split, orders it canonically and keeps every world-th row.
    rows = training_rows(cfg, read_split(cfg, "train").shard(rank, world), log=log)
    validation = fit_to_length(cfg, read_split(cfg, "validation"), "validation", log)
    recipe = setup_recipe(cfg, manifest, len(rows), device, rank, world, log=log)
    out.mkdir(parents=True, exist_ok=True)

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        if folder is not None and metrics["improved"]:
            shutil.rmtree(out / "model", ignore_errors=True)
            shutil.copytree(folder, out / "model")
        if folder is not None:
            shutil.rmtree(out / "last", ignore_errors=True)
            shutil.copytree(folder, out / "last")

    resume = Path(cfg.train.resume_from) if cfg.train.resume_from else None
    state = train_recipe(recipe, rows, validation, device, rank, world, report, resume, log=log)
    if rank == 0:
        (out / "history.json").write_text(json.dumps(state.history, indent=2))
    if world > 1:
        torch.distributed.destroy_process_group()
    return {
        "history": state.history,
        "best": state.best,
        "best_step": state.best_step,
        "stopped_early": state.stopped_early,
        "model_dir": str(out / "model"),
        "last_dir": str(out / "last"),
    }


def main() -> None:
    from lepton_ray.config import load_experiment
    from lepton_ray.data.preprocess import load_manifest

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
