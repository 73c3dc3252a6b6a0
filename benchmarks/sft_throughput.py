"""SFT training throughput: lepton-ray's causal_lm loop against TRL's ``SFTTrainer``.

    .venv/bin/python benchmarks/sft_throughput.py                      # packing on and off
    .venv/bin/python benchmarks/sft_throughput.py --rows 64 --steps 2 --warmup-steps 1  # smoke

Same model (``smollm2``: SmolLM2-135M-Instruct, a Q4_1 GGUF dequantized to fp32, so a lossy
copy of the released weights), same data (the first ``--rows`` rows of
``../shared/data/alpaca_5000``, user turn = instruction [+ blank line + input], assistant turn
= output, rendered by the tokenizer's own ChatML template, examples over ``--max-length``
tokens dropped for both sides), loss on the assistant tokens only, same LoRA (r=16, alpha=32,
dropout 0.05, q/k/v/o_proj), same precision (``resolve_precision('auto', 'cpu')``: bf16
autocast where the CPU has native bf16, TRL then gets ``bf16=True``; else fp32 for both),
AdamW lr 2e-4, linear decay, no warm-up of the schedule, grad-norm clip 1.0, one process,
``torch.set_num_threads(--threads)``.

* ``lepton-ray``: ``get_task('causal_lm').encoder`` (ChatEncoder: labels and parts per
  token) -> ``TokenRows.from_frames`` -> (``pack_rows`` with packing) -> ``run_training``
  (collate, ``model_inputs``: a 4D block-diagonal mask when packed, ``token_loss``).
  Two orders: lepton-ray's default, ``train.group_by_length: true`` (batches of similar
  length, in random order), and ``random order`` (as TRL's default sampler), the latter
  without packing only (a packed row is full either way). Timed by the loop's own per-step
  seconds.
* ``trl``: ``SFTTrainer`` on a conversational prompt-completion dataset (TRL masks the
  prompt: ``completion_only_loss`` defaults to on for such data), ``peft_config`` with the
  same LoRA, ``packing=True`` -> TRL's default ``bfd`` strategy, which turns on
  ``padding_free``: a batch is flattened into one row with restarting ``position_ids`` and no
  attention mask (on CPU with sdpa, transformers rebuilds a block-causal mask from the
  position ids). Timed from the end of the last warm-up step to the end of the last step
  (on_step_end callbacks); tokens counted in ``compute_loss``.

Each configuration runs ``--warmup-steps`` (not timed) then ``--steps`` optimizer steps, the
two libraries one after the other (lepton-ray, TRL, lepton-ray, TRL, ... for ``--repeats``).
Real tokens: non-padding input tokens; trained tokens: positions whose next token is a
response label. Results go to ``benchmarks/results/sft_throughput-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ALPACA = SHARED / "alpaca_5000" / "alpaca_5000.json"
GSM8K = SHARED / "gsm8k" / "test.jsonl"
MODEL = "smollm2"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LR = 2e-4
LEPTON, RANDOM = "lepton-ray", "lepton-ray random order"
LOSSY = "SmolLM2-135M-Instruct from a Q4_1 GGUF, dequantized (a lossy copy of the weights)"


def log(line: str) -> None:
    print(line, flush=True)


def need(path: Path) -> Path:
    if not path.is_file():
        sys.exit(f"skipped: {path} is absent (this benchmark reads ../shared/data)")
    return path


def load_alpaca(start: int, count: int) -> list[dict]:
    rows = json.loads(need(ALPACA).read_text())
    return rows[start : start + count]


def alpaca_turns(row: dict) -> list[dict[str, str]]:
    """As ``chat.row_turns`` renders an alpaca row (no system turn: the template adds its own)."""
    extra = (row.get("input") or "").strip()
    user = row["instruction"] if not extra else f"{row['instruction']}\n\n{extra}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def cpu_facts() -> dict:
    from lepton_ray.hardware import cpu_features
    from lepton_ray.train.precision import resolve_precision

    features = cpu_features()
    precision = resolve_precision("auto", "cpu", features)
    return {
        "cpu_model": features.model_name,
        "cpu_units": list(features.units()),
        "precision": precision.name,
        "precision_reason": precision.reason,
    }


def encode_rows(rows: list[dict], max_length: int):
    """The lepton-ray task's own encoder: canonical texts -> ids, labels, parts (drops the
    examples over ``max_length``); returns the kept turns too (TRL trains on the same)."""
    import pandas as pd

    from lepton_ray.tasks import get_task
    from lepton_ray.tasks.chat import canonical

    task = get_task("causal_lm")
    encode = task.encoder(
        MODEL,
        max_length,
        {"template": "tokenizer", "format": "alpaca", "train_on_prompt": False, "too_long": "drop"},
    )
    turns = [alpaca_turns(r) for r in rows]
    texts = [canonical(t) for t in turns]
    out = encode(texts)
    keep = [i for i, d in enumerate(out["drop"]) if not d]
    frame = pd.DataFrame(
        {
            "text": [texts[i] for i in keep],
            **{k: [out[k][i] for i in keep] for k in ("input_ids", "labels", "parts")},
        }
    )
    return task, frame, [turns[i] for i in keep]


def lora_model(precision_name: str):
    """The base model (fp32 weights) wrapped in the benchmark's LoRA (lepton-ray's side)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from lepton_ray.config.model import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=TARGETS, **LORA)
    return get_peft_model(model, config)


# ------------------------------------------------------------------------------ lepton-ray
def lepton_run(task, rows, pad_id: int, args, packing: bool, grouped: bool, seed: int = 42) -> dict:
    """Warm-up steps, then ``args.steps`` timed steps of ``run_training`` on a fresh LoRA."""
    import numpy as np
    import torch

    from lepton_ray.tasks.causal_lm_eval import EvalData, trained_tokens
    from lepton_ray.train.batching import epoch_batches
    from lepton_ray.train.loop import (
        LoopSettings,
        LoopState,
        build_optimizer,
        build_scheduler,
        run_training,
    )
    from lepton_ray.train.packing import pack_rows
    from lepton_ray.train.precision import resolve_precision

    torch.manual_seed(seed)
    train_rows = pack_rows(rows, args.max_length) if packing else rows
    precision = resolve_precision("auto", "cpu")
    model = lora_model(precision.name)
    device = torch.device("cpu")
    total = args.warmup_steps + args.steps
    optimizer = build_optimizer(model, LR, 0.0)
    scheduler = build_scheduler(optimizer, total, 0.0, "linear")
    empty = EvalData([])  # no validation: the end-of-run evaluation is a no-op

    def settings(steps: int, run_seed: int) -> LoopSettings:
        return LoopSettings(
            epochs=1,
            batch_size=args.batch_size,
            max_grad_norm=1.0,
            max_steps_per_epoch=steps,
            log_every_steps=10**9,
            metric="val_loss",
            mode="min",
            seed=run_seed,
            group_by_length=grouped,
        )

    common = dict(
        pad_id=pad_id,
        eval_batches=lambda: empty,
        task=task,
        labels=[],
        device=device,
        precision=precision,
        log=lambda _line: None,
    )
    model.train()
    if args.warmup_steps:  # another seed: the timed steps see other batches
        run_training(
            model,
            optimizer,
            scheduler,
            train_rows,
            settings=settings(args.warmup_steps, seed + 1),
            state=LoopState(),
            **common,
        )
    timed = settings(args.steps, seed)
    state = run_training(
        model, optimizer, scheduler, train_rows, settings=timed, state=LoopState(), **common
    )
    h = state.history[-1]
    batches = epoch_batches(train_rows, args.batch_size, seed, 0, 0, grouped)
    batches = batches[: args.steps]
    trained = sum(trained_tokens(train_rows.targets_of(b)) for b in batches)
    real = sum(int(train_rows.lengths[b].sum()) for b in batches)
    seconds = h["train_seconds"]
    result = {
        "seconds": seconds,
        "real_tokens": real,
        "trained_tokens": trained,
        "tokens_per_s": h["train_tokens_per_s"],
        "trained_tokens_per_s": trained / seconds,
        "loss": h["train_loss"],
        "padding_fraction": h["padding_fraction"],
        "rows_per_step": float(np.mean([len(b) for b in batches])),
        "train_rows": len(train_rows),
        "precision": precision.name,
    }
    del model, optimizer
    return result


# ------------------------------------------------------------------------------ TRL
def trl_run(turns: list, args, packing: bool, out_dir: Path, seed: int = 42) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lepton_ray.config.model import resolve_model_path
    from lepton_ray.train.precision import resolve_precision

    precision = resolve_precision("auto", "cpu")
    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = Dataset.from_list([{"prompt": t[:1], "completion": t[1:]} for t in turns])
    total = args.warmup_steps + args.steps
    marks: dict[str, float] = {}
    counts = {"real": 0, "trained": 0, "steps": 0}
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == args.warmup_steps:
                marks["start"] = time.perf_counter()
            if state.global_step == total:
                marks["end"] = time.perf_counter()

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs and state.global_step > args.warmup_steps:
                losses.append(float(logs["loss"]))

    class Counted(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            if self.state.global_step >= args.warmup_steps and model.training:
                if "attention_mask" in inputs:
                    counts["real"] += int(inputs["attention_mask"].sum())
                else:
                    counts["real"] += int(inputs["position_ids"].numel())
                counts["trained"] += int((inputs["labels"][:, 1:] != -100).sum())
                counts["steps"] += 1
            return super().compute_loss(model, inputs, *a, **kw)

    config = SFTConfig(
        output_dir=str(out_dir),
        max_steps=total,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=args.max_length,
        packing=packing,
        bf16=precision.name == "bf16",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=seed,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=TARGETS, **LORA)
    trainer = Counted(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Clock()],
    )
    info = {
        "completion_only_loss": trainer.completion_only_loss,
        "padding_free": trainer.padding_free,
        "packing_strategy": config.packing_strategy if packing else None,
        "train_rows": len(trainer.train_dataset),
        "attn_implementation": trainer.model.config._attn_implementation,
    }
    trainer.train()
    seconds = marks["end"] - marks["start"]
    result = {
        "seconds": seconds,
        "real_tokens": counts["real"],
        "trained_tokens": counts["trained"],
        "tokens_per_s": counts["real"] / seconds,
        "trained_tokens_per_s": counts["trained"] / seconds,
        "loss": statistics.mean(losses) if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
        "counted_steps": counts["steps"],
        "precision": "bf16" if config.bf16 else "fp32",
        **info,
    }
    del trainer, model
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=400, help="first N alpaca rows (default 400)")
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps (default 12)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--packing", choices=("on", "off", "both"), default="both")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (lepton-ray, TRL)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--order",
        choices=("grouped", "random", "both"),
        default="both",
        help="lepton-ray's batch order without packing: grouped by length (its default), "
        "random (as TRL), or both (default)",
    )
    args = p.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"skipped: {SHARED} is absent (this benchmark reads ../shared/data)")

    import tempfile

    import torch

    from lepton_ray.train.batching import TokenRows

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    facts = cpu_facts()
    log(f"[sft] {facts['cpu_model']}: {facts['precision_reason']}; loadavg {load_start}")
    task, frame, turns = encode_rows(load_alpaca(0, args.rows), args.max_length)
    rows = TokenRows.from_frames([frame], task.stored_targets(), sort_by_text=False)
    from lepton_ray.tasks.causal_lm import chat_tokenizer

    pad_id = chat_tokenizer(MODEL, "tokenizer", "alpaca").pad_token_id
    log(
        f"[sft] {len(rows)} of {args.rows} examples within {args.max_length} tokens, "
        f"{rows.tokens} tokens (mean {rows.tokens / max(len(rows), 1):.0f})"
    )
    configs = {"on": [True], "off": [False], "both": [False, True]}[args.packing]
    orders = {"grouped": [True], "random": [False], "both": [True, False]}[args.order]
    results: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory(prefix="sft-tp-") as tmp:
        for packing in configs:
            name = "packing" if packing else "no packing"
            sides = [LEPTON if g else RANDOM for g in (orders if not packing else [True])]
            results[name] = {side: [] for side in (*sides, "trl")}
            for r in range(args.repeats):
                for side in results[name]:
                    t0 = time.perf_counter()
                    if side == "trl":
                        res = trl_run(turns, args, packing, Path(tmp) / f"trl-{packing}-{r}")
                    else:
                        res = lepton_run(task, rows, pad_id, args, packing, side == LEPTON)
                    res["wall_s"] = time.perf_counter() - t0
                    results[name][side].append(res)
                    log(
                        f"[sft] {name} {side} round {r + 1}: {res['tokens_per_s']:.0f} real "
                        f"tokens/s, {res['trained_tokens_per_s']:.0f} trained tokens/s, "
                        f"loss {res['loss']:.4f} ({res['seconds']:.1f} s timed, "
                        f"{res['wall_s']:.0f} s wall)"
                    )
    load_end = os.getloadavg()

    def med(name, side, key):
        return statistics.median(x[key] for x in results[name][side])

    table = []
    for name, sides in results.items():
        trl_tps, trl_tr = med(name, "trl", "tokens_per_s"), med(name, "trl", "trained_tokens_per_s")
        for side in (s for s in sides if s != "trl"):
            lr_tps, lr_tr = med(name, side, "tokens_per_s"), med(name, side, "trained_tokens_per_s")
            table.append(
                {
                    "config": name if side == LEPTON else f"{name}, {side}",
                    "lepton_tokens_per_s": lr_tps,
                    "trl_tokens_per_s": trl_tps,
                    "ratio": lr_tps / trl_tps,
                    "lepton_trained_per_s": lr_tr,
                    "trl_trained_per_s": trl_tr,
                    "trained_ratio": lr_tr / trl_tr,
                    "lepton_loss": med(name, side, "loss"),
                    "trl_loss": med(name, "trl", "loss"),
                }
            )
    import peft
    import transformers
    import trl

    payload = {
        "machine": {
            **machine(),
            **facts,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
        },
        "model": LOSSY,
        "args": vars(args),
        "argv": sys.argv,
        "examples": len(rows),
        "results": results,
        "table": table,
    }
    stamp = payload["machine"]["date"][:10]
    path = write(f"sft_throughput-{stamp}", payload)
    log(f"\nwrote {path}; loadavg start {load_start}, end {load_end}")
    log(
        f"\nModel: {LOSSY}. {facts['cpu_model']}, {facts['precision']}, batch {args.batch_size}, "
        f"max_length {args.max_length}, {args.steps} timed steps after {args.warmup_steps}.\n"
    )
    log(
        "| configuration | real tokens/s lepton-ray | real tokens/s TRL | ratio | trained tokens/s "
        "lepton-ray | trained tokens/s TRL | ratio | mean loss lepton-ray | mean loss TRL |"
    )
    log("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in table:
        log(
            f"| {t['config']} | {t['lepton_tokens_per_s']:.0f} | {t['trl_tokens_per_s']:.0f} | "
            f"{t['ratio']:.2f}x | {t['lepton_trained_per_s']:.0f} | {t['trl_trained_per_s']:.0f} | "
            f"{t['trained_ratio']:.2f}x | {t['lepton_loss']:.3f} | {t['trl_loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
