"""Compressed formats side by side: accuracy, size and speed of each against fp32.

    python benchmarks/quantize.py --model /tmp/lrt-bench/keep/model \
        --data ../shared/data/sst2/dev.tsv --train ../shared/data/sst2/train.tsv

The model is a lepton-ray artifact (adapters are merged, as `compress` does). Every
variant is written as an artifact by the project's own code and loaded back as a Serve
replica loads it; that loaded model is what is measured. All variants see the same
tokenized batches (the model's own cleaning, batch 32, dynamic padding, <= max_length
tokens) and, for batch 1, the same single rows. Speed: the variants alternate (A B C ... A B
C ...) after a warm-up, and each figure is the median of the repeats. Accuracy, macro-F1,
prediction agreement with fp32 and the largest logit difference come from one full pass.
The CPU model and its flags are recorded with the figures: they only compare on one CPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, write  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared/data/sst2"
VARIANTS = (
    "fp32",
    "int8_today",
    "int8_pc",
    "int8_pc_head",
    "int8_pc_head_emb",
    "int8_pc_head_emb_sens",
    "onnx_fp32",
    "onnx_int8",
    "onnx_int8_pc_head_emb",
    "bf16",
    "bf16_autocast",
    "torchao_int8",
)
DESCRIPTIONS = {
    "fp32": "float32, as trained",
    "int8_today": "torch dynamic int8, every Linear, per-tensor scales (before this change)",
    "int8_pc": "torch dynamic int8, every Linear, per-channel scales",
    "int8_pc_head": "+ classifier head kept fp32",
    "int8_pc_head_emb": "+ embedding tables int8 per-row (compress default)",
    "int8_pc_head_emb_sens": "+ N most sensitive Linears fp32 (ranked on train rows)",
    "onnx_fp32": "ONNX Runtime, float32 graph (export check)",
    "onnx_int8": "ONNX Runtime dynamic int8, every MatMul, per-channel, float embeddings",
    "onnx_int8_pc_head_emb": "ONNX Runtime dynamic int8, per-channel, head fp32, embeddings uint8",
    "bf16": "bfloat16 weights",
    "bf16_autocast": "fp32 weights, bf16 autocast",
    "torchao_int8": "torchao Int8DynamicActivationInt8Weight (per-token acts, per-channel wts)",
}


def _texts(path: str, text_column: str, label_column: str):
    import pandas as pd

    frame = pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",", quoting=3)
    return [str(t) for t in frame[text_column]], [str(v) for v in frame[label_column]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/lrt-bench/keep/model")
    parser.add_argument("--data", default=str(SHARED / "dev.tsv"))
    parser.add_argument("--train", default=str(SHARED / "train.tsv"))
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--rows", type=int, default=None, help="first N rows only (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch1-rows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calibration-rows", type=int, default=256)
    parser.add_argument("--sensitive-layers", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--out", default="quantize")
    args = parser.parse_args()

    import torch

    from lepton_ray.artifacts import ModelMeta, save_float_artifact
    from lepton_ray.compress.formats import (
        load_model_artifact,
        quantize_dynamic_int8,
        save_int8_artifact,
    )
    from lepton_ray.compress.select import choose_method
    from lepton_ray.hardware import cpu_features
    from lepton_ray.tasks.base import encode_texts
    from lepton_ray.tasks.classification_eval import evaluate

    for path in (args.data, args.train):
        if not Path(path).is_file():
            sys.exit(f"skipped: {path} is absent (the benchmark reads ../shared/data)")
    if not (Path(args.model) / "lepton_model.json").is_file():
        sys.exit(f"skipped: {args.model} is not a lepton-ray model artifact")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    wanted = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    model, tokenizer, meta = load_model_artifact(args.model, merge=True)
    model = model.float().eval()
    texts, raw_labels = _texts(args.data, args.text_column, args.label_column)
    texts, raw_labels = texts[: args.rows], raw_labels[: args.rows]
    label_index = {label: i for i, label in enumerate(meta.labels)}
    labels = [label_index[v] for v in raw_labels]
    batches = []
    for i in range(0, len(texts), args.batch_size):
        enc, _ = encode_texts(tokenizer, meta, texts[i : i + args.batch_size])
        enc = dict(enc)
        enc["labels"] = torch.tensor(labels[i : i + args.batch_size])
        batches.append(enc)
    singles = [dict(encode_texts(tokenizer, meta, [t])[0]) for t in texts[: args.batch1_rows]]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    train_texts, train_labels = _texts(args.train, args.text_column, args.label_column)
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(train_texts), generator=gen)[: args.calibration_rows].tolist()
    calibration = []
    for i in range(0, len(pick), args.batch_size):
        chunk = [train_texts[j] for j in pick[i : i + args.batch_size]]
        calibration.append(dict(encode_texts(tokenizer, meta, chunk)[0]))

    tmp = Path(tempfile.mkdtemp(prefix="lrt-quantize-bench-"))

    def mb(folder: Path) -> float:
        files = list(folder.rglob("*.safetensors")) + list(folder.rglob("*.onnx"))
        return sum(f.stat().st_size for f in files) / 1e6

    def meta_for(weights: str, method: str) -> ModelMeta:
        return ModelMeta(
            meta.task,
            meta.labels,
            meta.base_model,
            meta.max_length,
            weights=weights,
            extra={"quantization": method},
            cleaning=dict(meta.cleaning),
        )

    built: dict[str, dict] = {}
    info: dict[str, dict] = {}

    def add(name: str, folder: Path, runner=None, **extra) -> None:
        started = time.perf_counter()
        loaded = runner or load_model_artifact(folder)[0]
        built[name] = {"model": loaded, "size_mb": mb(folder)}
        info[name] = {"load_s": time.perf_counter() - started, **extra}
        print(f"built {name}: {built[name]['size_mb']:.1f} MB", flush=True)

    def int8(name: str, **recipe) -> None:
        started = time.perf_counter()
        folder = tmp / name
        q = quantize_dynamic_int8(model, **recipe)
        save_int8_artifact(q, tokenizer, meta_for("int8", "dynamic_int8"), folder)
        add(
            name,
            folder,
            recipe={k: v for k, v in recipe.items()},
            build_s=time.perf_counter() - started,
        )

    fp32_dir = tmp / "fp32"
    save_float_artifact(model, tokenizer, meta_for("full", "none"), fp32_dir)
    add("fp32", fp32_dir, runner=model)
    if "int8_today" in wanted:
        int8("int8_today")
    if "int8_pc" in wanted:
        int8("int8_pc", per_channel=True)
    if "int8_pc_head" in wanted:
        int8("int8_pc_head", per_channel=True, keep_float=["classifier"])
    if "int8_pc_head_emb" in wanted:
        int8("int8_pc_head_emb", per_channel=True, keep_float=["classifier"], embeddings=True)
    if "int8_pc_head_emb_sens" in wanted:
        from lepton_ray.compress.sensitivity import rank_linears

        started = time.perf_counter()
        ranked = rank_linears(model, calibration, ["classifier"], per_channel=True)
        rank_s = time.perf_counter() - started
        keep = ["classifier"] + [n for n, _ in ranked[: args.sensitive_layers]]
        print(f"ranked {len(ranked)} Linears in {rank_s:.1f} s; kept fp32: {keep}", flush=True)
        int8("int8_pc_head_emb_sens", per_channel=True, keep_float=keep, embeddings=True)
        info["int8_pc_head_emb_sens"]["rank_s"] = rank_s
        info["int8_pc_head_emb_sens"]["ranking"] = ranked
    onnx_wanted = [v for v in wanted if v.startswith("onnx")]
    if onnx_wanted:
        from lepton_ray.compress.modules import OnnxClassifier
        from lepton_ray.compress.onnx_int8 import check_export, export_onnx, quantize_onnx_int8

        started = time.perf_counter()
        fp32_onnx = export_onnx(model, batches[0], tmp / "onnx_fp32" / "model.onnx")
        export_s = time.perf_counter() - started
        check = check_export(model, fp32_onnx, batches)
        print(f"ONNX export {export_s:.1f} s; check against torch: {check}", flush=True)
        if "onnx_fp32" in wanted:
            add("onnx_fp32", fp32_onnx.parent, runner=OnnxClassifier(fp32_onnx), export=check)
        for name, recipe in (
            ("onnx_int8", {"per_channel": True, "keep_float": [], "embeddings": False}),
            (
                "onnx_int8_pc_head_emb",
                {"per_channel": True, "keep_float": ["classifier"], "embeddings": True},
            ),
        ):
            if name not in wanted:
                continue
            folder = tmp / name
            started = time.perf_counter()
            quantize_onnx_int8(fp32_onnx, folder / "model.onnx", **recipe)
            tokenizer.save_pretrained(folder)
            meta_for("onnx_int8", "onnx_int8").save(folder)
            add(name, folder, recipe=recipe, build_s=time.perf_counter() - started)
    if "bf16" in wanted:
        save_float_artifact(
            copy.deepcopy(model).to(torch.bfloat16),
            tokenizer,
            meta_for("bf16", "bf16"),
            tmp / "bf16",
        )
        add("bf16", tmp / "bf16")
    if "bf16_autocast" in wanted:

        class Autocast(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, **kw):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return self.inner(**kw)

        built["bf16_autocast"] = {"model": Autocast(model), "size_mb": built["fp32"]["size_mb"]}
        info["bf16_autocast"] = {}
    if "torchao_int8" in wanted:
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            ao = copy.deepcopy(model)
            quantize_(ao, Int8DynamicActivationInt8WeightConfig())
            ao.eval()
            with torch.inference_mode():
                ao(**{k: v for k, v in batches[0].items() if k != "labels"})
            built["torchao_int8"] = {"model": ao, "size_mb": float("nan")}
            info["torchao_int8"] = {"note": "in memory only: no safetensors format"}
        except Exception as err:  # noqa: BLE001 - report, do not stop the benchmark
            info["torchao_int8"] = {"error": f"{type(err).__name__}: {err}"[:300]}
            print(f"torchao_int8 skipped: {info['torchao_int8']['error']}", flush=True)

    names = [n for n in VARIANTS if n in built]

    def pass32(m) -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            for b in batches:
                m(**{k: v for k, v in b.items() if k != "labels"})
            return len(texts) / (time.perf_counter() - started)

    def pass1(m) -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            for s in singles:
                m(**s)
            return len(singles) / (time.perf_counter() - started)

    quality: dict[str, dict] = {}
    fp32_logits = None
    for name in names:
        m = built[name]["model"]
        res = evaluate(m, [dict(b) for b in batches], len(meta.labels))
        with torch.inference_mode():
            logits = torch.cat(
                [m(**{k: v for k, v in b.items() if k != "labels"}).logits.float() for b in batches]
            )
        if fp32_logits is None:
            fp32_logits = logits
        quality[name] = {
            "accuracy": res["accuracy"],
            "macro_f1": res["macro_f1"],
            "agreement_with_fp32": float(
                (logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean()
            ),
            "max_abs_logit_diff_vs_fp32": float((logits - fp32_logits).abs().max()),
        }
        print(f"quality {name}: {quality[name]}", flush=True)

    # warm-up: one batch-32 pass and a few single rows each
    for name in names:
        m = built[name]["model"]
        pass32(m)
        with torch.inference_mode():
            for s in singles[:8]:
                m(**s)
    rates32: dict[str, list[float]] = {n: [] for n in names}
    rates1: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:
            rates32[name].append(pass32(built[name]["model"]))
            rates1[name].append(pass1(built[name]["model"]))
        print(
            f"repeat {r + 1}: "
            + ", ".join(f"{n} {rates32[n][-1]:.0f}/{rates1[n][-1]:.0f}" for n in names),
            flush=True,
        )

    features = cpu_features()
    choice = choose_method("auto", "cpu", features)
    base32 = median(rates32["fp32"])
    base1 = median(rates1["fp32"])
    rows = {}
    for name in names:
        rows[name] = {
            "description": DESCRIPTIONS[name],
            **quality[name],
            "accuracy_drop_points": 100 * (quality["fp32"]["accuracy"] - quality[name]["accuracy"]),
            "size_mb": built[name]["size_mb"],
            "median_samples_per_s_batch32": median(rates32[name]),
            "median_samples_per_s_batch1": median(rates1[name]),
            "speedup_batch32": median(rates32[name]) / base32,
            "speedup_batch1": median(rates1[name]) / base1,
            "samples_per_s_batch32": rates32[name],
            "samples_per_s_batch1": rates1[name],
            **info.get(name, {}),
        }
    result = {
        "machine": {
            **machine(),
            "cpu_described": features.describe(),
            "cpu_flags": sorted(features.flags),
        },
        "model": args.model,
        "data": args.data,
        "rows": len(texts),
        "real_tokens_per_row": tokens / len(texts),
        "batch_size": args.batch_size,
        "batch1_rows": len(singles),
        "max_length": meta.max_length,
        "threads": threads,
        "repeats": args.repeats,
        "calibration_rows": len(pick),
        "auto_choice": {"method": choice.method, "reason": choice.reason},
        "variants": rows,
        "skipped": {k: v for k, v in info.items() if "error" in v},
    }
    path = write(args.out, result)
    print(
        f"\n{args.model} on {args.data} ({len(texts)} rows, {tokens / len(texts):.1f} real tokens "
        f"a row, batch {args.batch_size} and 1, {threads} threads, {args.repeats} repeats); "
        f"CPU: {features.describe()}; full numbers: {path}"
    )
    print(f"compress.method auto here -> {choice.method}: {choice.reason}")
    header = f"{'variant':<24} {'accuracy':>8} {'drop pts':>8} {'agree':>6} {'MB':>6} {'b32/s':>7} {'x fp32':>6} {'b1/s':>7} {'x fp32':>6}"
    print(header)
    for name, row in rows.items():
        print(
            f"{name:<24} {row['accuracy']:>8.4f} {row['accuracy_drop_points']:>8.2f} "
            f"{row['agreement_with_fp32']:>6.3f} {row['size_mb']:>6.1f} "
            f"{row['median_samples_per_s_batch32']:>7.1f} {row['speedup_batch32']:>6.2f} "
            f"{row['median_samples_per_s_batch1']:>7.1f} {row['speedup_batch1']:>6.2f}"
        )


if __name__ == "__main__":
    main()
