"""Batches, loss and evaluation of a causal language model: pure torch, no Ray.

A token row's targets are ``(T, 2)`` int32: its labels (:data:`chat.IGNORE` where not
trained) and parts (context / response / last response); a packed row has a third column,
each token's position in its own example, which restarts at every example.

- ``collate`` pads rows (labels -100 on padding: padding is masked by the attention mask,
  never by token id, since pad = eos for many models) and, for packed rows, adds
  ``position_ids`` and ``segment_ids``;
- ``model_inputs`` turns segments into what the attention kernel honours: a 4D
  block-diagonal causal mask (additive floats; a boolean 4D mask is read wrongly by eager
  attention in transformers 5), or, for flash-attention's variable-length path, the
  restarting ``position_ids`` alone;
- ``token_loss`` is the mean cross-entropy of next-token prediction over trained positions;
  no position predicts across an example boundary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lepton_ray.tasks.chat import IGNORE, LAST_RESPONSE

VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")
"""Attention implementations that read example boundaries from restarting position ids."""
MASKED_KERNELS = ("sdpa", "eager")
"""Attention implementations that take a 4D additive mask (checked to match unpacked runs)."""


def collate(input_ids: Sequence[Sequence[int]], targets: Sequence[np.ndarray] | None, pad_id: int):
    import torch

    lengths = [len(seq) for seq in input_ids]
    width = max(lengths, default=0)
    n = len(lengths)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), IGNORE, dtype=np.int64)
    packed = targets is not None and n and np.asarray(targets[0]).shape[-1] == 3
    positions = np.zeros((n, width), dtype=np.int64) if packed else None
    segments = np.full((n, width), -1, dtype=np.int64) if packed else None
    for row, (seq, length) in enumerate(zip(input_ids, lengths)):
        ids[row, :length] = seq
        mask[row, :length] = 1
        if targets is None:
            continue
        t = np.asarray(targets[row])
        labels[row, :length] = t[:, 0]
        if packed:
            positions[row, :length] = t[:, 2]
            segments[row, :length] = np.cumsum(t[:, 2] == 0) - 1
            labels[row, :length][t[:, 2] == 0] = IGNORE  # never predicted from another example
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if targets is not None:
        batch["labels"] = torch.from_numpy(labels)
    if packed:
        batch["position_ids"] = torch.from_numpy(positions)
        batch["segment_ids"] = torch.from_numpy(segments)
    return batch


def attention_kernel(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def block_causal_mask(segments, dtype):
    """(B, L) segment ids (-1: padding) -> (B, 1, L, L) additive mask: a position sees the
    positions before it in its own example only."""
    import torch

    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] >= 0)
    allowed = causal[None] & same
    # A padding row sees itself, so no softmax row is all -inf (NaN); its loss is masked.
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def model_inputs(batch: dict, model) -> dict:
    """What the model's forward takes of a batch (labels stay out: the loss is ours)."""
    import torch

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "segment_ids")}
    if "segment_ids" not in batch:
        return inputs
    kernel = attention_kernel(getattr(model, "module", model))  # DDP wraps the model
    if kernel in VARLEN_KERNELS:
        inputs.pop("attention_mask")  # boundaries from position_ids
        return inputs
    if kernel not in MASKED_KERNELS:
        raise ValueError(
            f"packing: attention '{kernel}' is not known to honour example boundaries; use "
            "sdpa, eager or flash_attention_2, or set data.packing: false"
        )
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        dtype = torch.float32
    inputs["attention_mask"] = block_causal_mask(batch["segment_ids"], dtype)
    return inputs


def token_loss(logits, labels, reduction: str = "mean", label_smoothing: float = 0.0):
    """Next-token cross-entropy over trained positions (labels shifted by one), with
    ``label_smoothing`` of the target spread over the vocabulary at those positions only.

    Only the trained positions' logits are upcast to fp32 and normalised: the prompt and
    padding rows of a (batch x length x vocab) tensor are never copied, which is most of the
    memory and a share of the time of a chat batch. A batch with no trained position gives a
    zero that keeps the graph (every weight still gets a gradient under DDP), not a NaN."""
    import torch.nn.functional as F

    shifted = labels[:, 1:].reshape(-1)
    live = shifted != IGNORE
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])[live].float()
    if flat.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(
        flat, shifted[live], reduction=reduction, label_smoothing=label_smoothing
    )


def trained_tokens(targets: Sequence[np.ndarray]) -> int:
    """Positions a batch of rows trains on (what its mean loss is an average over)."""
    total = 0
    for t in targets:
        t = np.asarray(t)
        live = t[1:, 0] != IGNORE
        if t.shape[-1] == 3:
            live &= t[1:, 2] != 0
        total += int(live.sum())
    return total


# ------------------------------------------------------------------------------ generation
@dataclass
class GenerationSample:
    """A fixed sample of validation prompts to generate from at every evaluation."""

    prompts: list[list[int]]
    references: list[str]
    prompt_texts: list[str]
    decode: Callable[[Sequence[int]], str]
    stop_ids: list[int]
    pad_id: int
    max_new_tokens: int
    batch_size: int
    scorer: str = "none"


@dataclass
class EvalData:
    """Evaluation input of a causal LM: collated batches and the generation sample."""

    batches: list[dict]
    generation: GenerationSample | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.batches)


def generation_sample(examples, count: int, decode, decode_prompt, **settings):
    """The first ``count`` examples (``(ids, parts)`` pairs, in canonical order) that have a
    last response: each one's prompt ids (the tokens before its last response) and its
    reference (that response, decoded)."""
    prompts, references, texts = [], [], []
    for ids, parts in examples:
        if len(prompts) >= count:
            break
        ids, parts = np.asarray(ids), np.asarray(parts)
        answer = np.flatnonzero(parts == LAST_RESPONSE)
        if not len(answer) or answer[0] == 0:
            continue
        prompts.append([int(t) for t in ids[: answer[0]]])
        references.append(decode(ids[answer]).strip())
        texts.append(decode_prompt(ids[: answer[0]]))
    if not prompts:
        return None
    return GenerationSample(prompts, references, texts, decode, **settings)


def generate(model, prompts: Sequence[Sequence[int]], stop_ids, pad_id, max_new_tokens, device):
    """Greedy continuations (token id lists, stop token excluded) and why each ended."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every row ends where it generates
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
    )
    results = []
    stops = set(stop_ids)
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), None)
        results.append(
            (row[:cut] if cut is not None else row, "stop" if cut is not None else "length")
        )
    return results


_SPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def final_number(text: str) -> str | None:
    """GSM8K's answer: the number after '####', else the last number in the text."""
    tail = text.split("####")[-1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return None
    return str(int(number)) if number.is_integer() else str(number)


def score_generations(outputs: Sequence[str], references: Sequence[str], scorer: str):
    """Per answer: exact match, ROUGE-L F1 (``rouge_score``) and the task scorer's score."""
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rows = []
    for out, ref in zip(outputs, references, strict=True):
        row = {
            "exact_match": float(normalize_answer(out) == normalize_answer(ref)),
            "rouge_l": float(rouge.score(ref, out)["rougeL"].fmeasure),
        }
        if scorer == "gsm8k":
            want = final_number(ref)
            row["gsm8k"] = float(want is not None and final_number(out) == want)
        rows.append(row)
    return rows


def run_generation(model, sample: GenerationSample, device, autocast=None):
    """Generate from every prompt of the sample; the table rows and the mean scores."""
    import torch

    outputs: list[str] = []
    finish: list[str] = []
    was_training = model.training
    model.eval()
    with torch.inference_mode(), (autocast or nullcontext)():
        for start in range(0, len(sample.prompts), sample.batch_size):
            chunk = sample.prompts[start : start + sample.batch_size]
            for ids, why in generate(
                model, chunk, sample.stop_ids, sample.pad_id, sample.max_new_tokens, device
            ):
                outputs.append(sample.decode(ids).strip())
                finish.append(why)
    if was_training:
        model.train()
    scores = score_generations(outputs, sample.references, sample.scorer)
    table = [
        {"prompt": p, "reference": r, "output": o, "finish_reason": f, **s}
        for p, r, o, f, s in zip(
            sample.prompt_texts, sample.references, outputs, finish, scores, strict=True
        )
    ]
    means = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]} if scores else {}
    return table, means


# ------------------------------------------------------------------------------ evaluation
def evaluate(
    model,
    data: Iterable[dict[str, Any]],
    device=None,
    rank: int = 0,
    world_size: int = 1,
    autocast: Callable[[], AbstractContextManager] | None = None,
    scorer: str = "none",
) -> dict[str, Any]:
    """Loss, perplexity and token accuracy over trained (response) tokens, every rank's
    share of the batches summed; then greedy generation on the sample (every rank the same
    prompts, so sharded models run their collectives in step)."""
    import torch
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    batches = list(data)
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, tokens, correct
    multi = world_size > 1 and dist.is_available() and dist.is_initialized()
    # Every rank runs the same number of forward passes (under FSDP each is a collective):
    # a rank out of batches runs a one-row dummy and drops its output.
    step = world_size if multi else 1
    rounds = -(-len(batches) // step) if batches else 0
    with torch.inference_mode(), (autocast or nullcontext)():
        for r in range(rounds):
            index = r * step + (rank if multi else 0)
            dummy = index >= len(batches)
            batch = {k: v[:1] for k, v in batches[0].items()} if dummy else batches[index]
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**model_inputs(batch, model)).logits
            if dummy:
                continue
            labels = batch["labels"]
            shifted = labels[:, 1:]
            live = shifted != IGNORE
            sums[0] += float(token_loss(logits, labels, reduction="sum"))
            sums[1] += float(live.sum())
            sums[2] += float(((logits[:, :-1].argmax(-1) == shifted) & live).sum())
    if multi:
        reduced = sums.to(device)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    tokens = float(sums[1])
    loss = float(sums[0] / tokens) if tokens else float("nan")
    result: dict[str, Any] = {
        "loss": loss,
        "perplexity": float(math.exp(min(loss, 50.0))) if tokens else float("nan"),
        "token_accuracy": float(sums[2] / tokens) if tokens else float("nan"),
        "tokens": int(tokens),
        "generations": [],
        "exact_match": float("nan"),
        "rouge_l": float("nan"),
    }
    if scorer == "gsm8k":
        result["gsm8k"] = float("nan")
    sample = getattr(data, "generation", None)
    if sample is not None:
        table, means = run_generation(model, sample, device, autocast)
        result["generations"] = table
        result.update(means)
    if was_training:
        model.train()
    return result
