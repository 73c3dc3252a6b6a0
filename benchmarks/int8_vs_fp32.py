"""int8 dynamic quantization against fp32: throughput and accuracy of the same model, same data.

    python benchmarks/int8_vs_fp32.py --model-uri models:/sst2-minilm-lora@champion \
        --data ../shared/data/sst2/dev.tsv --text-column sentence --label-column label

The fp32 model is the registered model with its LoRA adapter merged (what `compress` starts
from); the int8 model is `compress`'s quantization of it. Both see the same tokenized batches
(batch 32, up to 64 tokens), alternating A B A B after a warm-up; the table gives the median
of the repeats and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternate, machine, median, timed, write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default="models:/sst2-minilm-lora@champion")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/sst2/dev.tsv")
    )
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all cores)"
    )
    args = parser.parse_args()

    import pandas as pd
    import torch

    from lepton_ray.compress.formats import load_model_artifact, quantize_dynamic_int8
    from lepton_ray.tasks.base import encode_texts
    from lepton_ray.tasks.classification_eval import evaluate
    from lepton_ray.tracking.mlflow import download_model

    if not Path(args.data).is_file():
        sys.exit(f"skipped: {args.data} is absent (the benchmark reads ../shared/data)")
    if args.threads:
        torch.set_num_threads(args.threads)
    frame = pd.read_csv(args.data, sep="\t" if args.data.endswith(".tsv") else ",", quoting=3)
    folder = download_model(args.tracking_uri, args.model_uri)
    fp32, tokenizer, meta = load_model_artifact(folder)
    int8 = quantize_dynamic_int8(fp32)
    label_index = {label: i for i, label in enumerate(meta.labels)}
    labels = [label_index[str(v)] for v in frame[args.label_column]]
    texts = [str(t) for t in frame[args.text_column]]
    batches = []
    for i in range(0, len(texts), args.batch_size):
        # The model's own cleaning, as in training and serving.
        enc, _ = encode_texts(
            tokenizer, meta, texts[i : i + args.batch_size], max_length=args.max_length
        )
        enc["labels"] = torch.tensor(labels[i : i + args.batch_size])
        batches.append(dict(enc))

    def run(model):
        def once() -> int:
            with torch.inference_mode():
                for batch in batches:
                    model(**{k: v for k, v in batch.items() if k != "labels"})
            return len(texts)

        return lambda: timed(once)

    samples = alternate({"fp32": run(fp32), "int8": run(int8)}, repeats=args.repeats)
    quality = {
        name: evaluate(model, (dict(b) for b in batches), len(meta.labels))
        for name, model in (("fp32", fp32), ("int8", int8))
    }
    result = {
        "machine": machine(),
        "model_uri": args.model_uri,
        "data": args.data,
        "rows": len(texts),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": torch.get_num_threads(),
        "samples_per_s": samples,
        "median_samples_per_s": {k: median(v) for k, v in samples.items()},
        "accuracy": {k: q["accuracy"] for k, q in quality.items()},
        "macro_f1": {k: q["macro_f1"] for k, q in quality.items()},
    }
    result["speedup_int8_over_fp32"] = (
        result["median_samples_per_s"]["int8"] / result["median_samples_per_s"]["fp32"]
    )
    path = write("int8_vs_fp32", result)
    print(
        f"\n{args.model_uri} on {args.data} ({len(texts)} rows, batch {args.batch_size}, "
        f"<= {args.max_length} tokens, {result['threads']} threads); full numbers: {path}"
    )
    print(f"{'model':<6} {'median samples/s':>17} {'accuracy':>9} {'macro-F1':>9}")
    for name in ("fp32", "int8"):
        print(
            f"{name:<6} {result['median_samples_per_s'][name]:>17.1f} "
            f"{result['accuracy'][name]:>9.4f} {result['macro_f1'][name]:>9.4f}"
        )
    print(f"int8 / fp32 throughput: {result['speedup_int8_over_fp32']:.2f}x")


if __name__ == "__main__":
    main()
