"""Sweep efficiency: TPE + ASHA against random search (with and without ASHA); LoRA rank.

    .venv/bin/python benchmarks/tune_efficiency.py               # 6 trials: about 40 min
    .venv/bin/python benchmarks/tune_efficiency.py --trials 8    # as in RESULTS.md
    .venv/bin/python benchmarks/tune_efficiency.py --smoke       # about 3 min: does it run?
    .venv/bin/python benchmarks/tune_efficiency.py --trials 8 \
        --sweeps-from benchmarks/results/tune_efficiency.json    # redo the LoRA rank table

Wall time on a 2-core machine: the sweeps dominate, and each trial pays some 20-30 s of
Ray Train start-up plus about 10 s around it (teardown, the next trial's launch) beside
about 13 s per epoch (two trials side by side). ``--trials 8`` took 90 min while other jobs
used 0.74 of the 2 CPUs on average; the default 6 trials are estimated at about 40 min on
an idle machine.

One fixed SST-2 subset: the first ``--rows`` rows of ``../shared/data/sst2/train.tsv`` train
(exact duplicates dropped, as in ``experiments/sst2_minilm_lora.yaml``) and the first
``--val-rows`` rows of GLUE's ``dev.tsv`` validate (written to the scratch folder, never into
the repository; dev shares no sentence with train). Model: the pretrained MiniLM-L6
(``model.name: minilm``) with LoRA on query/value, max length 64, batch 32, ``--epochs``
epochs, evaluation after every epoch, ``train.seed`` fixed.

**Sweeps.** Three methods, each a sweep of ``--trials`` trials through lepton-ray's own tune
stage (``run_tune`` under a ``tune`` parent run, as ``lepton-ray tune`` runs it, without
registering the best trial), once per seed in ``--seeds`` (``tune.seed``), seeds outer and
methods inner so that load drift hits every method alike:

* ``tpe+asha``: Optuna TPE (lepton-ray's multivariate TPE, a third of the trials random
  first) with ASHA (grace period 1 epoch, reduction factor 2, max_t = epochs);
* ``random+asha``: Optuna random search with the same ASHA;
* ``random``: random search, no early stopping (``scheduler.type: none``).

Same space for all (``SPACE``): lr log-uniform 1e-4..1e-2 (on this budget of about 110
steps, rates up to 3e-4 leave the model at the majority class and 2e-2 diverges; the best
lie near 3e-3..6e-3, inside the range), LoRA r in {4, 8, 16}, alpha r or 2r, warm-up 0 or
10 %. The config's own point lies outside the space (its r is 2), so no sweep starts with
lepton-ray's baseline trial: every trial is the searcher's. With one seed, random search
samples the same points with and without ASHA, and TPE's first (random) trials are those
points too (under two concurrent trials TPE samples at random until two trials have
finished: in practice the first three). Each trial has ``--trial-cpus`` CPUs (default 1:
two trials side by side on the private Ray's 2 CPUs, as Tune fits them by default, which
overlaps one trial's start-up with the other's training).

Measured from every trial's MLflow run (runs tagged ``lepton.stage = trial`` under the
sweep's parent): the metric histories of ``val_accuracy`` and ``epoch``, joined on the step.
A sweep's reports are put in the order MLflow stamped them; its compute after a report is
the trial-epochs reported so far (every trial's epochs up to its latest report: the epoch
a concurrent trial has under way, or a stopped trial had begun, is not counted). Reported
per method: the best validation accuracy of each seed (mean, std, min-max), the trial-epochs
each sweep spent, and the trial-epochs it spent before it FIRST reported an accuracy within
``--tolerance`` (0.5 points) of the overall best (best over every method and seed); a sweep
that never got there is counted as not reached. The issue's goal: TPE + ASHA needs at most
half the compute of random search without early stopping.

**LoRA rank.** r in ``--ranks`` (2, 4, 8, 16, 32), lr ``--rank-lr`` (3e-3), alpha = 2r, the
same epochs and data, trained one after the other in this process with ``train_standalone``
(the loop every trial runs, without Ray; ``--threads`` threads): best validation accuracy
and trainable parameters (the classifier head included). Then training samples/s, side by
side: ``--rank-rounds`` rounds alternating the ranks (r2 r4 ... r2 r4 ...), each run
``--rank-steps`` steps of one epoch's first batches (the same batches for every rank),
timed by the loop's own clock (training steps only); the median of the rounds. The
accuracy runs' per-epoch samples/s are kept too (consecutive, not alternated).
``--sweeps-from`` reuses the sweeps of an earlier results JSON (same data settings) and
runs only this table, e.g. when load spoilt its samples/s; the JSON then keeps the earlier
run's facts and rank table under ``sweeps_run``.

Trial-epochs do not depend on load; samples/s and wall times do. Recorded for every sweep
and rank run: the load average before and after (this run's own Ray processes count in it)
and the CPUs that processes outside this run's process tree used on average ("others'
CPUs", sampled every 5 s). Results go to ``benchmarks/results/tune_efficiency.json``
(``--out``) with the machine, versions and git SHA. The MLflow store, the Ray session's files
and the validation file live in a scratch folder under /tmp, deleted at the end (``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternate, median  # noqa: E402
from train_throughput import (  # noqa: E402
    SHARED,
    experiment,
    log,
    machine_facts,
    need_data,
    private_ray,
    save,
    wait_for_cpus,
)

METHODS = {
    "tpe+asha": {"search": "tpe", "scheduler": "asha"},
    "random+asha": {"search": "random", "scheduler": "asha"},
    "random": {"search": "random", "scheduler": "none"},
}
SPACE = {
    "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    "peft.lora.r": {"type": "choice", "values": [4, 8, 16]},
    "peft.lora.lora_alpha": {"ratio_of": "peft.lora.r", "values": [1, 2]},
    "train.warmup_ratio": {"type": "choice", "values": [0.0, 0.1]},
}
OUTSIDE_THE_SPACE = 2
"""The config's own LoRA r: not one of SPACE's, so the sweeps have no baseline trial."""
ASHA = {"grace_period": 1, "reduction_factor": 2}
SMOKE = {
    "rows": 160,
    "val_rows": 64,
    "epochs": 2,
    "trials": 2,
    "seeds": "0",
    "ranks": "2,8",
    "max_steps": 2,
    "rank_rounds": 1,
    "rank_steps": 2,
}


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (this benchmark's own Ray processes count too)."""
    return [round(x, 2) for x in os.getloadavg()]


class ForeignCpu:
    """CPU seconds of the processes outside this benchmark's process tree (its Ray workers
    are inside it): other people's jobs sharing the machine. A thread samples every
    ``every`` seconds; ``seconds`` is the running total (a process that starts and ends
    between two samples is missed)."""

    def __init__(self, every: float = 5.0):
        import psutil

        self.psutil = psutil
        self.every = every
        self.seconds = 0.0
        self.started = time.time()
        self.seen: dict[tuple[int, float], float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="foreign-cpu", daemon=True)

    def __enter__(self) -> ForeignCpu:
        self._sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        me = self.psutil.Process()
        mine = {me.pid} | {child.pid for child in me.children(recursive=True)}
        for proc in self.psutil.process_iter(["pid", "create_time", "cpu_times"]):
            info = proc.info
            if info["cpu_times"] is None or info["create_time"] is None:
                continue
            key = (info["pid"], info["create_time"])
            used = info["cpu_times"].user + info["cpu_times"].system
            # A process older than the sampler counts from its first sample; a newer one
            # from its start.
            before = self.seen.get(key, used if info["create_time"] < self.started else 0.0)
            self.seen[key] = used
            if info["pid"] not in mine:
                self.seconds += max(0.0, used - before)


def validation_file(source: Path, rows: int, folder: Path) -> Path:
    """The header and the first ``rows`` rows of ``source``, in the scratch folder."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    path = folder / f"{source.stem}-first{rows}{source.suffix}"
    path.write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return path


def base_config(args, tmp: Path, validation: Path):
    """The config every sweep and rank run starts from (no sweep yet)."""
    from lepton_ray.config import apply_overrides

    data = {
        "path": str(args.data_root / "sst2" / "train.tsv"),
        "text_column": "sentence",
        "label_column": "label",
        "max_rows": args.rows,
        "split": {
            "test": 0.0,  # as experiments/sst2_minilm_lora.yaml: every row of the subset trains
            "seed": 42,
            "files": {"validation": str(validation)},
            "contamination": "remove",
        },
        "dedup": {"exact": True, "conflicts": "majority"},
        "max_length": args.max_length,
    }
    peft = {
        "method": "lora",
        "lora": {
            "r": OUTSIDE_THE_SPACE,
            "lora_alpha": 2 * OUTSIDE_THE_SPACE,
            "lora_dropout": 0.1,
            "target_modules": ["query", "value"],
        },
    }
    train = {
        "epochs": args.epochs,
        "batch_size": args.batch,
        "lr": args.rank_lr,
        "warmup_ratio": 0.1,
        "torch_threads": args.trial_cpus,
        "max_steps_per_epoch": args.max_steps,
        "seed": 42,
    }
    scaling = {"num_workers": 1, "resources_per_worker": {"CPU": args.trial_cpus}}
    cfg = experiment(tmp, data, train, peft, scaling)
    return apply_overrides(cfg, {"name": "tune-efficiency"})


def sweep_config(base, method: str, seed: int, trials: int, extra: dict | None = None):
    from lepton_ray.config import apply_overrides

    spec = METHODS[method]
    tune = {
        "enabled": True,
        "num_samples": trials,
        "metric": "val_accuracy",
        "search": spec["search"],
        "scheduler": {"type": spec["scheduler"], **ASHA},
        "space": SPACE,
        "seed": seed,
        **(extra or {}),
    }
    return apply_overrides(base, {"tune": tune})


def run_sweep(
    base, manifest: dict, method: str, seed: int, trials: int, foreign, extra=None
) -> dict:
    """One sweep through the tune stage; its trials' reports as MLflow recorded them.
    ``extra``: more ``tune`` settings (the served objective)."""
    from lepton_ray.tracking.mlflow import TAG_STAGE, lineage_tags, log_config, tracked_run
    from lepton_ray.tune.driver import run_tune

    cfg = sweep_config(base, method, seed, trials, extra)
    wait_for_cpus()
    before = load()
    log(f"[bench] sweep {method}, seed {seed}: {trials} trials (load {before})")
    started, cpu = time.perf_counter(), foreign.seconds
    tags = lineage_tags(cfg, manifest.get("fingerprint"), **{TAG_STAGE: "tune"})
    with tracked_run(cfg, f"tune-{method}-seed{seed}", tags=tags) as parent:
        log_config(cfg.tracking.tracking_uri, parent, cfg)
        best = run_tune(cfg, manifest, parent, log=log)
    wall = time.perf_counter() - started
    return {
        "method": method,
        "seed": seed,
        "parent_run_id": parent,
        "wall_s": wall,
        "load_before": before,
        "load_after": load(),
        "foreign_cpus": (foreign.seconds - cpu) / wall,
        "best_trial_reported": best["metrics"],
        "trials": trial_records(cfg, parent),
    }


def trial_records(cfg, parent_run_id: str) -> list[dict]:
    """Every trial run under the sweep: its parameters, how and when it started and ended,
    and each evaluation (step, epoch, val_accuracy, MLflow's timestamp in ms)."""
    from lepton_ray.tracking.mlflow import TAG_PARENT, TAG_STAGE, TAG_TRIAL_ID, client
    from lepton_ray.tune.report import TAG_STOPPED_BY

    c = client(cfg.tracking.tracking_uri)
    runs = c.search_runs(
        [c.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}' and tags.`{TAG_STAGE}` = 'trial'",
        max_results=1000,
    )
    records = []
    for run in runs:
        run_id = run.info.run_id
        epochs = {m.step: m.value for m in c.get_metric_history(run_id, "epoch")}
        reports = [
            {
                "step": m.step,
                "epoch": epochs.get(m.step),
                "val_accuracy": m.value,
                "timestamp_ms": m.timestamp,
            }
            for m in c.get_metric_history(run_id, "val_accuracy")
        ]
        reports.sort(key=lambda r: (r["timestamp_ms"], r["step"]))
        tags = run.data.tags
        records.append(
            {
                "trial_id": tags.get(TAG_TRIAL_ID),
                "run_id": run_id,
                "status": run.info.status,
                "start_ms": run.info.start_time,
                "end_ms": run.info.end_time,
                "params": {
                    k.removeprefix("lepton.param."): v
                    for k, v in tags.items()
                    if k.startswith("lepton.param.")
                },
                "stopped_by": tags.get(TAG_STOPPED_BY),
                "params_trainable": run.data.metrics.get("params_trainable"),
                "reports": reports,
            }
        )
    records.sort(key=lambda t: t["reports"][0]["timestamp_ms"] if t["reports"] else float("inf"))
    return records


def timeline(sweep: dict) -> list[dict]:
    """The sweep's evaluations in the order they were reported, each with the trial-epochs
    reported so far (``compute``) and the best accuracy so far."""
    events = [
        (r["timestamp_ms"], r["step"], trial["trial_id"], r)
        for trial in sweep["trials"]
        for r in trial["reports"]
    ]
    events.sort(key=lambda e: e[:3])
    reached: dict[str, float] = {}
    compute, best, out = 0.0, float("-inf"), []
    for _, _, trial_id, r in events:
        epoch = r["epoch"] or 0.0
        compute += epoch - reached.get(trial_id, 0.0)
        reached[trial_id] = epoch
        best = max(best, r["val_accuracy"])
        out.append(
            {
                "trial_id": trial_id,
                "epoch": epoch,
                "val_accuracy": r["val_accuracy"],
                "compute": round(compute, 3),
                "best_so_far": best,
            }
        )
    return out


def compute_to(events: list[dict], target: float) -> float | None:
    """Trial-epochs spent when the sweep first reported ``target`` or better; None: never."""
    return next((e["compute"] for e in events if e["val_accuracy"] >= target - 1e-9), None)


def spread(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarise(sweeps: list[dict], tolerance: float) -> dict:
    """Per method: best accuracy, compute spent and compute to the target over the seeds;
    and whether TPE + ASHA needed at most half of random search's compute."""
    for sweep in sweeps:
        sweep["timeline"] = timeline(sweep)
        accuracies = [e["val_accuracy"] for e in sweep["timeline"]]
        sweep["best_val_accuracy"] = max(accuracies) if accuracies else None
        sweep["trial_epochs"] = sweep["timeline"][-1]["compute"] if sweep["timeline"] else 0.0
        sweep["early_stopped"] = sum(1 for t in sweep["trials"] if t["stopped_by"])
    overall = max(s["best_val_accuracy"] for s in sweeps if s["best_val_accuracy"] is not None)
    target = overall - tolerance
    methods = {}
    for method in METHODS:
        mine = [s for s in sweeps if s["method"] == method]
        if not mine:
            continue
        per_seed = {}
        for s in mine:
            s["compute_to_target"] = compute_to(s["timeline"], target)
            per_seed[s["seed"]] = {
                "best_val_accuracy": s["best_val_accuracy"],
                "trial_epochs": s["trial_epochs"],
                "compute_to_target": s["compute_to_target"],
                "trials": len(s["trials"]),
                "early_stopped": s["early_stopped"],
                "wall_s": s["wall_s"],
                "foreign_cpus": s["foreign_cpus"],
            }
        reached = [v["compute_to_target"] for v in per_seed.values()]
        methods[method] = {
            "per_seed": per_seed,
            "best_val_accuracy": spread([v["best_val_accuracy"] for v in per_seed.values()]),
            "trial_epochs": spread([v["trial_epochs"] for v in per_seed.values()]),
            "compute_to_target": spread([x for x in reached if x is not None]),
            "reached": f"{sum(x is not None for x in reached)}/{len(reached)}",
            "wall_s": spread([v["wall_s"] for v in per_seed.values()]),
            "foreign_cpus": spread([v["foreign_cpus"] for v in per_seed.values()]),
        }
    return {
        "overall_best": overall,
        "target": target,
        "tolerance": tolerance,
        "methods": methods,
        "goal": goal(methods),
    }


def goal(methods: dict) -> dict:
    """Did TPE + ASHA reach the target with at most half the trial-epochs of random search
    without early stopping? Per seed: the ratio where both reached it; where only TPE + ASHA
    did, it holds if it needed at most half of what random search spent in all (random
    search would have needed more than that); where only random search did, it fails.
    Overall it holds only if it holds on every seed."""
    tpe, rnd = methods.get("tpe+asha"), methods.get("random")
    if not (tpe and rnd):
        return {"holds": None, "why": "both tpe+asha and random are needed"}
    per_seed = {}
    for seed, mine in tpe["per_seed"].items():
        other = rnd["per_seed"].get(seed)
        if other is None:
            continue
        a, b = mine["compute_to_target"], other["compute_to_target"]
        if a is not None and b is not None:
            per_seed[seed] = {"ratio": a / b, "holds": a / b <= 0.5}
        elif a is not None:
            bound = a / other["trial_epochs"]
            per_seed[seed] = {"ratio_below": bound, "holds": True if bound <= 0.5 else None}
        else:
            per_seed[seed] = {"holds": False if b is not None else None}
    verdicts = [v["holds"] for v in per_seed.values()]
    holds = False if False in verdicts else (None if None in verdicts else True)
    both = [v["ratio"] for v in per_seed.values() if "ratio" in v]
    everywhere = len(both) == len(per_seed)
    return {
        "per_seed": per_seed,
        "holds": holds,
        "seeds_where_it_holds": verdicts.count(True),
        "ratio_of_means": (
            tpe["compute_to_target"]["mean"] / rnd["compute_to_target"]["mean"]
            if everywhere and per_seed
            else None
        ),
    }


def run_ranks(base, manifest: dict, args, tmp: Path, foreign) -> list[dict]:
    """Train each LoRA rank in turn (``args.ranks``, lr ``args.rank_lr``, alpha 2r, the
    machine's ``args.threads`` threads) for accuracy, then measure its training samples/s
    in ``args.rank_rounds`` alternating rounds (r1 r2 ... r1 r2 ...) of
    ``args.rank_steps`` steps each."""
    from lepton_ray.config import apply_overrides
    from lepton_ray.train.peft import parameter_counts
    from lepton_ray.train.recipe import build_peft_model
    from lepton_ray.train.standalone import train_standalone

    lr, steps = args.rank_lr, args.rank_steps

    def config(r: int, **train):
        lora = {"peft.lora.r": r, "peft.lora.lora_alpha": 2 * r}
        return apply_overrides(
            base, {**lora, "train.lr": lr, "train.torch_threads": args.threads, **train}
        )

    def rate(r: int):
        """One short run's training samples/s (the loop's own clock: steps only)."""
        cfg = config(r, **{"train.epochs": 1, "train.max_steps_per_epoch": steps})

        def run() -> float:
            history = train_standalone(cfg, manifest, tmp / f"rate-{r}", log=lambda _: None)
            return history["history"][-1]["train_samples_per_s"]

        return run

    wait_for_cpus()
    out = []
    for r in args.ranks:
        cfg = config(r)
        trainable = parameter_counts(build_peft_model(cfg, manifest["labels"]))
        before = load()
        log(f"[bench] LoRA r={r}, alpha {2 * r}, lr {lr:g} (load {before})")
        started, cpu = time.perf_counter(), foreign.seconds
        history = train_standalone(cfg, manifest, tmp / f"rank-{r}", log=log)["history"]
        out.append(
            {
                "r": r,
                "lora_alpha": 2 * r,
                "lr": lr,
                "best_val_accuracy": max(h["val_accuracy"] for h in history),
                "final_val_accuracy": history[-1]["val_accuracy"],
                **trainable,
                "samples_per_s_per_epoch": [h["train_samples_per_s"] for h in history],
                "samples_per_s_epochs_median": median([h["train_samples_per_s"] for h in history]),
                "train_seconds": sum(h["train_seconds"] for h in history),
                "wall_s": time.perf_counter() - started,
                "load_before": before,
                "load_after": load(),
                "foreign_cpus": (foreign.seconds - cpu) / (time.perf_counter() - started),
                "history": history,
            }
        )
    before = load()
    rounds = args.rank_rounds
    log(f"[bench] LoRA rank samples/s: {rounds} alternating rounds of {steps} steps ({before})")
    # The accuracy runs above were the warm-up.
    started, cpu = time.perf_counter(), foreign.seconds
    rates = alternate({r: rate(r) for r in args.ranks}, repeats=rounds, warmup=0)
    rounds_info = {
        "load_before": before,
        "load_after": load(),
        "foreign_cpus": (foreign.seconds - cpu) / (time.perf_counter() - started),
    }
    for row in out:
        row["samples_per_s"] = median(rates[row["r"]])
        row["samples_per_s_rounds"] = rates[row["r"]]
        row["rounds"] = rounds_info
    return out


def run_served(base, manifest: dict, args, foreign) -> dict:
    """One TPE + ASHA sweep with ``tune.objective: served``: its ``args.served_top_k`` best
    trials by float validation accuracy merged, compressed (``compress.method: auto`` on
    this CPU), scored on the dev rows as served and timed at batch 1 and 32; the sweep's
    own ``tune/served.json`` says who won each ranking."""
    import json

    from lepton_ray.config import apply_overrides
    from lepton_ray.tracking.mlflow import client

    # Compression on, as a served model is made: the method auto picks for this CPU.
    base = apply_overrides(base, {"compress.enabled": True, "compress.method": "auto"})
    extra = {"objective": "served", "served_top_k": args.served_top_k, "served_batch_size": 32}
    sweep = run_sweep(base, manifest, "tpe+asha", args.served_seed, args.trials, foreign, extra)
    uri = base.tracking.tracking_uri
    path = client(uri).download_artifacts(sweep["parent_run_id"], "tune/served.json")
    sweep["served"] = json.loads(Path(path).read_text())
    return sweep


def print_served(sweep: dict) -> None:
    served = sweep["served"]
    rows = served["trials"]
    float_winner, winner = rows[0]["trial_id"], served["winner"]
    print(
        f"\nServed objective (seed {sweep['seed']}): the top {len(rows)} trials by float "
        f"val accuracy, as served; rankings {'agree' if served['agree'] else 'DISAGREE'}\n"
    )
    print(
        "| trial | won by | float val acc | served val acc | served as | p50 ms, batch 1 "
        "| p50 ms, batch 32 |"
    )
    print("| --- | --- | ---: | ---: | --- | ---: | ---: |")
    for row in rows:
        won = [n for n, t in (("float", float_winner), ("served", winner)) if t == row["trial_id"]]
        print(
            f"| {row['trial_id']} | {' + '.join(won) or '-'} | {row['float']:.4f} | "
            f"{row['served']:.4f} | {row['format']} | {row['p50_ms']:.2f} | "
            f"{row['p50_ms_batch']:.2f} |"
        )


def print_tables(summary: dict | None, ranks: list[dict], setup: str) -> None:
    print(f"\n{setup}\n")
    if summary:
        print_sweeps(summary)
    if ranks:
        print_ranks(ranks)


def print_sweeps(summary: dict) -> None:
    def cell(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    print(
        f"Sweeps: target = overall best {summary['overall_best']:.4f} - "
        f"{summary['tolerance']:.3f} = {summary['target']:.4f}\n"
    )
    print(
        "| method | best val accuracy, mean ± std (min-max) | trial-epochs spent "
        "| trial-epochs to target, per seed | reached | wall s per sweep | others' CPUs |"
    )
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for method, m in summary["methods"].items():
        acc = m["best_val_accuracy"]
        per_seed = ", ".join(
            cell(v["compute_to_target"], "g") if v["compute_to_target"] is not None else "not"
            for v in m["per_seed"].values()
        )
        print(
            f"| {method} | {acc['mean']:.4f} ± {acc['std']:.4f} ({acc['min']:.4f}-"
            f"{acc['max']:.4f}) | {m['trial_epochs']['mean']:.1f} | {per_seed} "
            f"(mean {cell(m['compute_to_target'].get('mean'))}) | {m['reached']} | "
            f"{m['wall_s']['mean']:.0f} | {m['foreign_cpus']['mean']:.2f} |"
        )
    g = summary["goal"]
    if "per_seed" not in g:
        print(f"\nGoal: not judged ({g['why']})")
        return
    verdict = {True: "holds", False: "does not hold", None: "undecided"}

    def seed_line(seed, v: dict) -> str:
        if "ratio" in v:
            return f"seed {seed}: ratio {v['ratio']:.2f}"
        if "ratio_below" in v:
            return f"seed {seed}: only TPE+ASHA reached it (ratio < {v['ratio_below']:.2f})"
        return f"seed {seed}: " + ("only random reached it" if v["holds"] is False else "neither")

    print(
        f"\nGoal (TPE+ASHA reaches the target with at most half the trial-epochs of random "
        f"search without early stopping): {verdict[g['holds']]}, on "
        f"{g['seeds_where_it_holds']} of {len(g['per_seed'])} seeds ("
        + "; ".join(seed_line(k, v) for k, v in g["per_seed"].items())
        + (f"; ratio of means {g['ratio_of_means']:.2f}" if g.get("ratio_of_means") else "")
        + ")"
    )


def print_ranks(ranks: list[dict]) -> None:
    rounds = ranks[0]["rounds"]
    print(
        f"\nLoRA rank (lr {ranks[0]['lr']:g}, alpha 2r); samples/s: median of "
        f"{len(ranks[0]['samples_per_s_rounds'])} alternating rounds (others' CPUs "
        f"{rounds['foreign_cpus']:.2f}) and of the accuracy run's epochs (others' CPUs)\n"
    )
    print(
        "| LoRA r | alpha | best val accuracy | trainable params | train samples/s, rounds "
        "| train samples/s, epochs |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in ranks:
        print(
            f"| {row['r']} | {row['lora_alpha']} | {row['best_val_accuracy']:.4f} | "
            f"{row['params_trainable']:,} | {row['samples_per_s']:.1f} | "
            f"{row['samples_per_s_epochs_median']:.1f} ({row['foreign_cpus']:.2f}) |"
        )


RUN_FACTS = ("machine", "settings", "wall_s", "load_start", "load_end", "foreign_cpus")
"""What a results JSON says about the run that made it (kept with sweeps reused)."""
SAME_DATA = ("rows", "val_rows", "max_length", "batch", "epochs", "max_steps")


def earlier_sweeps(args) -> dict:
    """The results JSON ``--sweeps-from`` names, if its data settings are this run's."""
    previous = json.loads(args.sweeps_from.read_text())
    if previous.get("sweeps_run"):  # itself a rerun: keep the facts of the sweeps' own run
        previous = {**previous, **previous["sweeps_run"]}
    settings = previous["settings"]
    differ = [k for k in SAME_DATA if settings.get(k) != getattr(args, k)]
    if differ:
        sys.exit(f"--sweeps-from {args.sweeps_from} used other settings: {differ}")
    return previous


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, default=SHARED, help="holds sst2/")
    p.add_argument("--rows", type=int, default=1200, help="first N rows of train.tsv")
    p.add_argument("--val-rows", type=int, default=400, help="first N rows of dev.tsv")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="per trial (ASHA's max_t)")
    p.add_argument("--trials", type=int, default=6, help="per sweep")
    p.add_argument("--seeds", default="0,1,2", help="tune.seed of each round of sweeps")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    p.add_argument("--tolerance", type=float, default=0.005, help="of the overall best")
    p.add_argument("--threads", type=int, default=2, help="CPUs of the private Ray")
    p.add_argument("--trial-cpus", type=int, default=1, help="CPUs (threads) per trial")
    p.add_argument("--ranks", default="2,4,8,16,32", help="LoRA ranks; '' skips the table")
    p.add_argument("--rank-lr", type=float, default=3e-3, help="lr of every LoRA rank run")
    p.add_argument("--rank-rounds", type=int, default=5, help="alternating samples/s rounds")
    p.add_argument("--rank-steps", type=int, default=20, help="steps of each samples/s run")
    p.add_argument(
        "--sweeps-from",
        type=Path,
        default=None,
        help="a results JSON whose sweeps to summarise instead of running sweeps (same data "
        "settings); e.g. to rerun only the LoRA rank table on a quieter machine",
    )
    p.add_argument("--served", action="store_true", help="add the served-objective sweep")
    p.add_argument(
        "--lr-range",
        default=None,
        help="LOW,HIGH of the searched lr (log-uniform; default 1e-4,1e-2): a wider range "
        "is a space where the learning rate matters more",
    )
    p.add_argument("--served-seed", type=int, default=0, help="tune.seed of that sweep")
    p.add_argument("--served-top-k", type=int, default=3, help="trials scored as served")
    p.add_argument("--max-steps", type=int, default=None, help="steps per epoch (smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: " + str(SMOKE))
    p.add_argument("--out", type=Path, default=None, help="result JSON path")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args()
    if args.lr_range:
        try:
            low, high = (float(x) for x in args.lr_range.split(","))
        except ValueError:
            sys.exit("--lr-range takes LOW,HIGH, e.g. --lr-range 1e-5,1e-1")
        if not 0 < low < high:
            sys.exit(f"--lr-range {args.lr_range}: needs 0 < LOW < HIGH")
        SPACE["train.lr"] = {"type": "loguniform", "low": low, "high": high}
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    args.data_root = args.data_root.expanduser().resolve()
    for name in ("train.tsv", "dev.tsv"):
        need_data(args.data_root / "sst2" / name)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        sys.exit(f"unknown method(s) {sorted(unknown)}; choose from {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    previous = earlier_sweeps(args) if args.sweeps_from else None
    if previous:
        seeds = []

    started, load_start = time.perf_counter(), load()
    with ForeignCpu() as foreign, private_ray(args.threads, args.keep) as tmp:
        from lepton_ray.data.preprocess import run_preprocess

        valid = validation_file(args.data_root / "sst2" / "dev.tsv", args.val_rows, tmp)
        base = base_config(args, tmp, valid)
        manifest = run_preprocess(base, log=log, force=True)
        sweeps = [
            run_sweep(base, manifest, method, seed, args.trials, foreign)
            for seed in seeds
            for method in methods
        ]
        rank_rows = run_ranks(base, manifest, args, tmp, foreign) if args.ranks else []
        served = run_served(base, manifest, args, foreign) if args.served else None
    wall = time.perf_counter() - started
    foreign_cpus = foreign.seconds / wall

    if previous:
        sweeps = previous["sweeps"]
        seeds = sorted({s["seed"] for s in sweeps})
    summary = summarise(sweeps, args.tolerance) if sweeps else None
    splits = manifest["splits"]
    setup = (
        f"MiniLM-L6 + LoRA (query, value) on SST-2: {splits['train']} train rows, "
        f"{splits['validation']} dev rows; {args.epochs} epochs per trial, {args.trials} "
        f"trials per sweep, seeds {seeds}, {args.trial_cpus} CPU(s) per trial; "
        + (f"sweeps from {args.sweeps_from}; " if previous else "")
        + f"this run {wall / 60:.1f} min, load {load_start} before and {load()} after; other "
        f"processes used {foreign_cpus:.2f} of the {os.cpu_count()} CPUs on average"
    )
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {
        "machine": machine_facts(),
        "settings": settings,
        "space": SPACE,
        "methods": METHODS,
        "asha": ASHA,
        "config_train": base.train.model_dump(mode="json"),
        "peft": base.peft.model_dump(mode="json"),
        "manifest": {k: manifest.get(k) for k in ("rows_read", "kept", "dropped", "splits")},
        "wall_s": wall,
        "load_start": load_start,
        "load_end": load(),
        "foreign_cpus": foreign_cpus,
        "summary": summary,
        "sweeps_run": previous
        and {
            **{k: previous.get(k) for k in RUN_FACTS},
            "lora_rank": previous.get("lora_rank"),
        },
        "sweeps": sweeps,
        "lora_rank": rank_rows,
        "served": served,
    }
    name = "tune_efficiency-smoke.json" if args.smoke else "tune_efficiency.json"
    path = save(result, args.out or Path(__file__).resolve().parent / "results" / name, "")
    print_tables(summary, rank_rows, setup)
    if served is not None:
        print_served(served)
    print(f"\nFull numbers: {path}")


if __name__ == "__main__":
    main()
