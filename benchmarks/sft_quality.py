"""SFT quality: generation scores of SmolLM2-135M before and after lepton-ray LoRA fine-tuning.

    .venv/bin/python benchmarks/sft_quality.py
    .venv/bin/python benchmarks/sft_quality.py --train-rows 64 --steps 4 --eval-rows 4 --gsm8k 2  # smoke

Model ``smollm2`` (SmolLM2-135M-Instruct from a Q4_1 GGUF, dequantized: a lossy copy). Train:
the first ``--train-rows`` rows of ``../shared/data/alpaca_5000`` through the task's own
encoder (ChatEncoder, assistant-only loss) and ``run_training`` (the standalone loop path),
LoRA r=16/alpha 32 on q/k/v/o_proj, lr 2e-4, ``--steps`` steps of ``--batch-size``, precision
``auto``, optional packing. Held out: ``--eval-rows`` alpaca rows from the end of the file
(never trained on), scored by greedy generation (``--max-new-tokens``) with ROUGE-L and exact
match (``score_generations`` through the task's ``evaluate``), plus their response loss; and
the first ``--gsm8k`` GSM8K test questions, scored by the final number. Both before and after
training, on the same prompts. Results go to ``benchmarks/results/sft_quality-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write  # noqa: E402
from sft_throughput import (  # noqa: E402
    GSM8K,
    LORA,
    LOSSY,
    LR,
    MODEL,
    SHARED,
    TARGETS,
    cpu_facts,
    encode_rows,
    load_alpaca,
    log,
    need,
)


def generation_data(task, frame, tokenizer, enc, turns, refs, pad_id, args, scorer):
    """EvalData: the held-out batches (loss) and a generation sample of their prompts."""
    import numpy as np

    from lepton_ray.tasks.causal_lm_eval import EvalData, GenerationSample, collate
    from lepton_ray.tasks.chat import stop_token_ids

    batches = []
    if frame is not None:
        ids = list(frame["input_ids"])
        targets = [np.stack([a, b], axis=1) for a, b in zip(frame["labels"], frame["parts"])]
        for k in range(0, len(ids), args.batch_size):
            batches.append(
                collate(ids[k : k + args.batch_size], targets[k : k + args.batch_size], pad_id)
            )
    prompts = [enc.prompt_ids(t) for t in turns]
    sample = GenerationSample(
        prompts=prompts,
        references=refs,
        prompt_texts=[t[-1]["content"][:80] for t in turns],
        decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
        stop_ids=stop_token_ids(tokenizer),
        pad_id=pad_id,
        max_new_tokens=args.max_new_tokens if scorer == "none" else args.gsm8k_new_tokens,
        batch_size=args.gen_batch_size,
        scorer=scorer,
    )
    return EvalData(batches, sample, {"scorer": scorer})


def score(model, data, precision, scorer):
    from lepton_ray.tasks.causal_lm_eval import evaluate

    t0 = time.perf_counter()
    out = evaluate(model, data, autocast=precision.autocast, scorer=scorer)
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train-rows", type=int, default=600)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--packing", choices=("on", "off"), default="on")
    p.add_argument("--eval-rows", type=int, default=30, help="held-out alpaca prompts")
    p.add_argument("--gsm8k", type=int, default=30, help="GSM8K test questions (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gsm8k-new-tokens", type=int, default=192)
    p.add_argument("--gen-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"skipped: {SHARED} is absent (this benchmark reads ../shared/data)")

    import torch
    from sft_throughput import lora_model

    from lepton_ray.tasks.causal_lm import chat_tokenizer
    from lepton_ray.tasks.causal_lm_eval import EvalData
    from lepton_ray.tasks.chat import ChatEncoder
    from lepton_ray.train.batching import TokenRows
    from lepton_ray.train.loop import (
        LoopSettings,
        LoopState,
        build_optimizer,
        build_scheduler,
        run_training,
    )
    from lepton_ray.train.packing import pack_rows
    from lepton_ray.train.precision import resolve_precision

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    facts = cpu_facts()
    log(f"[sft-q] {facts['cpu_model']}: {facts['precision_reason']}; loadavg {load_start}")

    task, train_frame, _ = encode_rows(load_alpaca(0, args.train_rows), args.max_length)
    held = json.loads(need(SHARED / "alpaca_5000" / "alpaca_5000.json").read_text())
    held = held[len(held) - args.eval_rows :] if args.eval_rows else []
    _, eval_frame, eval_turns = encode_rows(held, args.max_length)
    tokenizer = chat_tokenizer(MODEL, "tokenizer", "alpaca")
    pad_id = tokenizer.pad_token_id
    enc = ChatEncoder(tokenizer, args.max_length, False, "drop")
    alpaca = generation_data(
        task,
        eval_frame,
        tokenizer,
        enc,
        [t[:1] for t in eval_turns],
        [t[1]["content"].strip() for t in eval_turns],
        pad_id,
        args,
        "none",
    )
    gsm = None
    if args.gsm8k:
        lines = need(GSM8K).read_text().splitlines()[: args.gsm8k]
        qs = [json.loads(line) for line in lines]
        gsm = generation_data(
            task,
            None,
            tokenizer,
            enc,
            [[{"role": "user", "content": q["question"]}] for q in qs],
            [q["answer"] for q in qs],
            pad_id,
            args,
            "gsm8k",
        )

    precision = resolve_precision("auto", "cpu")
    torch.manual_seed(args.seed)
    model = lora_model(precision.name)
    before = {"alpaca": score(model, alpaca, precision, "none")}
    if gsm:
        before["gsm8k"] = score(model, gsm, precision, "gsm8k")
    log(f"[sft-q] before: alpaca {before['alpaca']['rouge_l']:.3f} ROUGE-L")

    rows = TokenRows.from_frames([train_frame], task.stored_targets(), sort_by_text=False)
    train_rows = pack_rows(rows, args.max_length) if args.packing == "on" else rows
    per_epoch = -(-len(train_rows) // args.batch_size)
    epochs = -(-args.steps // per_epoch)
    settings = LoopSettings(
        epochs=epochs,
        batch_size=args.batch_size,
        max_grad_norm=1.0,
        max_steps_per_epoch=min(per_epoch, args.steps),
        log_every_steps=10,
        metric="val_loss",
        mode="min",
        seed=args.seed,
        group_by_length=False,
    )
    total = settings.steps_per_epoch(len(train_rows)) * epochs
    optimizer = build_optimizer(model, LR, 0.0)
    scheduler = build_scheduler(optimizer, total, 0.05, "linear")
    t0 = time.perf_counter()
    state = run_training(
        model,
        optimizer,
        scheduler,
        train_rows,
        pad_id=pad_id,
        eval_batches=lambda: EvalData([]),
        task=task,
        labels=[],
        settings=settings,
        state=LoopState(),
        device=torch.device("cpu"),
        precision=precision,
        log=log,
    )
    train_wall = time.perf_counter() - t0
    after = {"alpaca": score(model, alpaca, precision, "none")}
    if gsm:
        after["gsm8k"] = score(model, gsm, precision, "gsm8k")
    load_end = os.getloadavg()

    def pick(res):
        keep = ("loss", "rouge_l", "exact_match", "gsm8k", "seconds")
        return {k: res[k] for k in keep if k in res} | {"generations": res["generations"]}

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
        "lora": {**LORA, "target_modules": TARGETS, "lr": LR},
        "args": vars(args),
        "argv": sys.argv,
        "train_examples": len(rows),
        "train_rows": len(train_rows),
        "steps": state.step,
        "epochs": epochs,
        "train_wall_s": train_wall,
        "history": state.history,
        "before": {k: pick(v) for k, v in before.items()},
        "after": {k: pick(v) for k, v in after.items()},
    }
    path = write(f"sft_quality-{payload['machine']['date'][:10]}", payload)
    log(f"\nwrote {path}; loadavg start {load_start}, end {load_end}")
    log(
        f"\nModel: {LOSSY}. {facts['cpu_model']}, {precision.name}; LoRA r=16 q/k/v/o, "
        f"{state.step} steps of {args.batch_size} ({'packed' if args.packing == 'on' else 'unpacked'}"
        f" rows of {args.max_length}) on {len(rows)} alpaca examples, {train_wall:.0f} s.\n"
    )
    log("| metric | before | after |")
    log("| --- | ---: | ---: |")
    n = len(alpaca.generation.prompts)
    a, b = before["alpaca"], after["alpaca"]
    log(
        f"| held-out alpaca response loss ({len(eval_turns)} ex.) | {a['loss']:.3f} | {b['loss']:.3f} |"
    )
    log(
        f"| held-out alpaca ROUGE-L ({n} prompts, greedy) | {a['rouge_l']:.3f} | {b['rouge_l']:.3f} |"
    )
    log(f"| held-out alpaca exact match | {a['exact_match']:.3f} | {b['exact_match']:.3f} |")
    if gsm:
        g0, g1 = before["gsm8k"], after["gsm8k"]
        m = len(gsm.generation.prompts)
        log(f"| GSM8K exact match, final number ({m} q.) | {g0['gsm8k']:.3f} | {g1['gsm8k']:.3f} |")


if __name__ == "__main__":
    main()
