"""Evaluation of a causal language model: the generation scores, loss / perplexity / token
accuracy over trained tokens, and the fixed sample of prompts generated from (tiny random
Llamas; SmolLM2's real tokenizer where text matters)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lepton_ray.tasks.causal_lm import CausalLM
from lepton_ray.tasks.causal_lm_eval import (
    EvalData,
    GenerationSample,
    collate,
    evaluate,
    final_number,
    generate,
    generation_sample,
    normalize_answer,
    score_generations,
    token_loss,
    trained_tokens,
)
from lepton_ray.tasks.chat import (
    CONTEXT,
    IGNORE,
    LAST_RESPONSE,
    RESPONSE,
    ChatEncoder,
    install_template,
)
from lepton_ray.train.batching import TokenRows

VOCAB = 96
PAD = 0


def _llama(vocab: int = VOCAB, pad: int = PAD):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=pad,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _example(n, context, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=n)
    parts = np.array([CONTEXT] * context + [LAST_RESPONSE] * (n - context))
    labels = np.where(parts == CONTEXT, IGNORE, ids)
    return ids, np.stack([labels, parts], axis=1)


def _decode(ids):
    return " ".join(f"t{int(t)}" for t in ids)


# ------------------------------------------------------------------------------ scores
def test_exact_match_after_whitespace_normalisation():
    assert normalize_answer("  Paris \n\t is  nice ") == "Paris is nice"
    rows = score_generations(
        ["Paris  is\nnice ", "paris is nice", "Paris"], ["Paris is nice"] * 3, "none"
    )
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]  # case counts
    assert all(set(r) == {"exact_match", "rouge_l"} for r in rows)


def test_rouge_l():
    same, partial, disjoint, empty = score_generations(
        ["the cat sat on the mat", "the cat sat", "dogs bark loudly", ""],
        ["the cat sat on the mat"] * 4,
        "none",
    )
    assert same["rouge_l"] == pytest.approx(1.0)
    # LCS 3 of 3 predicted and 6 reference tokens: F1 = 2 * 1 * 0.5 / 1.5.
    assert partial["rouge_l"] == pytest.approx(2 / 3)
    assert 0.0 < partial["rouge_l"] < 1.0
    assert disjoint["rouge_l"] == 0.0
    assert empty["rouge_l"] == 0.0


def test_final_number_of_gsm8k_answers():
    assert final_number("She pays 3 * 400 = 1,200 + 34.\n#### 1,234") == "1234"
    assert final_number("#### 72") == "72"
    assert final_number("So the answer is 18 eggs, not 16.") == "16"  # the last number
    assert final_number("The total is 42.") == "42"
    assert final_number("It costs 3.50") == "3.5"
    assert final_number("#### 5.0") == "5"
    assert final_number("a loss of -7") == "-7"
    assert final_number("I do not know") is None
    assert final_number("") is None
    # After '####' only the tail counts.
    assert final_number("12 apples #### none") is None


def test_gsm8k_score():
    refs = ["Natalia sold 48/2 = 24 clips.\n#### 72", "#### 1,234", "#### 10", "no number"]
    outs = ["48 + 24 = 72 clips in all", "The answer is 1234.", "#### 11", "5"]
    rows = score_generations(outs, refs, "gsm8k")
    assert [r["gsm8k"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert all(r["exact_match"] == 0.0 for r in rows)
    with pytest.raises(ValueError):  # one output per reference
        score_generations(["a"], ["a", "b"], "none")


# ------------------------------------------------------------------------------ evaluate
def _batches():
    examples = [_example(n, c, seed) for seed, (n, c) in enumerate([(9, 4), (6, 2), (12, 7)])]
    examples.append(_example(7, 7, 9))  # nothing trained in it: it counts no tokens
    first = collate([e[0] for e in examples[:2]], [e[1] for e in examples[:2]], PAD)
    second = collate([e[0] for e in examples[2:]], [e[1] for e in examples[2:]], PAD)
    return examples, [first, second]


@torch.no_grad()
def test_evaluate_loss_perplexity_and_accuracy(llama):
    examples, batches = _batches()
    result = evaluate(llama, batches)
    tokens = trained_tokens([t for _, t in examples])
    assert tokens == sum(n - c for n, c in [(9, 4), (6, 2), (12, 7)])
    assert result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert 0.0 <= result["token_accuracy"] <= 1.0
    # The loss is the mean over every trained token of all batches (not a mean of batches).
    total = sum(
        float(
            token_loss(
                llama(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits,
                b["labels"],
                reduction="sum",
            )
        )
        for b in batches
    )
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["loss"] == pytest.approx(math.log(VOCAB), rel=0.2)  # random init
    # Token accuracy by hand.
    correct = 0
    for b in batches:
        logits = llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        shifted = b["labels"][:, 1:]
        correct += int(((logits[:, :-1].argmax(-1) == shifted) & (shifted != IGNORE)).sum())
    assert result["token_accuracy"] == pytest.approx(correct / tokens)
    assert result["generations"] == [] and math.isnan(result["exact_match"])
    assert "gsm8k" not in result
    assert "gsm8k" in evaluate(llama, batches, scorer="gsm8k")


@torch.no_grad()
def test_evaluate_without_trained_tokens_is_nan(llama):
    ids, targets = _example(5, 5, 1)
    result = evaluate(llama, [collate([ids], [targets], PAD)])
    assert result["tokens"] == 0
    assert math.isnan(result["loss"]) and math.isnan(result["perplexity"])


def _sample(examples, **over):
    settings = {
        "stop_ids": [1],
        "pad_id": PAD,
        "max_new_tokens": 4,
        "batch_size": 2,
        "scorer": "none",
        **over,
    }
    return generation_sample(
        ((ids, t[:, 1]) for ids, t in examples), 8, _decode, _decode, **settings
    )


@torch.no_grad()
def test_evaluate_with_a_generation_sample(llama):
    examples, batches = _batches()
    sample = _sample(examples)
    assert isinstance(sample, GenerationSample)
    assert len(sample.prompts) == 3  # the untrained example has no response
    result = CausalLM().evaluate(llama, EvalData(batches, sample, {"scorer": "none"}), [])
    table = result["generations"]
    assert len(table) == 3
    for row, prompt, ref in zip(table, sample.prompt_texts, sample.references):
        assert set(row) == {
            "prompt",
            "reference",
            "output",
            "finish_reason",
            "exact_match",
            "rouge_l",
        }
        assert row["prompt"] == prompt and row["reference"] == ref
        assert row["finish_reason"] in ("stop", "length")
        # Greedy tokens, at most max_new_tokens of them.
        assert len(row["output"].split()) <= 4
        assert 0.0 <= row["rouge_l"] <= 1.0 and row["exact_match"] in (0.0, 1.0)
    assert math.isfinite(result["exact_match"]) and math.isfinite(result["rouge_l"])
    assert result["rouge_l"] == pytest.approx(np.mean([r["rouge_l"] for r in table]))
    assert result["tokens"] == evaluate(llama, batches)["tokens"]  # generation changes nothing
    assert llama.training is False

    # Every token a stop token: empty answers that ended on 'stop'.
    stopped = _sample(examples, stop_ids=list(range(VOCAB)), scorer="gsm8k")
    result = CausalLM().evaluate(llama, EvalData(batches, stopped, {"scorer": "gsm8k"}), [])
    assert {r["output"] for r in result["generations"]} == {""}
    assert {r["finish_reason"] for r in result["generations"]} == {"stop"}
    assert result["exact_match"] == 0.0 and result["gsm8k"] == 0.0
    assert CausalLM().reported(result)["gsm8k"] == 0.0


@torch.no_grad()
def test_generation_restores_training_mode(llama):
    examples, batches = _batches()
    from lepton_ray.tasks.causal_lm_eval import run_generation

    llama.train()
    try:
        run_generation(llama, _sample(examples), "cpu")
        assert llama.training
    finally:
        llama.eval()


@torch.no_grad()
def test_left_padded_batch_generation_matches_one_prompt_at_a_time(llama):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    together = generate(llama, prompts, [1], PAD, 5, "cpu")
    alone = [generate(llama, [p], [1], PAD, 5, "cpu")[0] for p in prompts]
    assert together == alone
    assert all(len(ids) <= 5 for ids, _ in together)


# ------------------------------------------------------------------------------ the sample
def test_generation_sample_takes_prompts_before_the_last_response():
    ids = np.arange(10, 20)
    two_turns = (ids, np.array([0, 0, 1, 1, 0, 0, 0, 2, 2, 2]))
    text_only = (np.arange(30, 34), np.array([RESPONSE] * 4))  # format text
    answer_first = (np.arange(40, 43), np.array([LAST_RESPONSE] * 3))
    short = (np.arange(50, 54), np.array([0, 0, 2, 2]))
    sample = generation_sample(
        [text_only, two_turns, answer_first, short],
        5,
        _decode,
        lambda x: "P:" + _decode(x),
        stop_ids=[1],
        pad_id=0,
        max_new_tokens=3,
        batch_size=1,
    )
    assert sample.prompts == [list(range(10, 17)), [50, 51]]
    assert sample.references == ["t17 t18 t19", "t52 t53"]
    assert sample.prompt_texts == ["P:" + _decode(range(10, 17)), "P:t50 t51"]
    assert (sample.max_new_tokens, sample.batch_size, sample.scorer) == (3, 1, "none")

    only_one = generation_sample(
        [two_turns, short],
        1,
        _decode,
        _decode,
        stop_ids=[1],
        pad_id=0,
        max_new_tokens=3,
        batch_size=1,
    )
    assert only_one.prompts == [list(range(10, 17))]  # the first ``count``, in order
    assert (
        generation_sample(
            [text_only, answer_first],
            4,
            _decode,
            _decode,
            stop_ids=[1],
            pad_id=0,
            max_new_tokens=3,
            batch_size=1,
        )
        is None
    )


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    install_template(tok, "tokenizer", needs_template=True)
    return tok


CONVERSATIONS = [
    [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "How many legs has a spider?"},
        {"role": "assistant", "content": "#### 8"},
    ],
]


def test_generation_sample_of_real_conversations(tokenizer):
    """The prompt is the served prompt (what ``prompt_ids`` renders), the reference the last
    assistant text."""
    enc = ChatEncoder(tokenizer, 256, False, "drop")
    examples = [enc.encode(turns) for turns in CONVERSATIONS]
    sample = generation_sample(
        [(ids, parts) for ids, _, parts in examples],
        4,
        lambda x: tokenizer.decode([int(t) for t in x], skip_special_tokens=True),
        lambda x: tokenizer.decode([int(t) for t in x]),
        stop_ids=[tokenizer.eos_token_id],
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=4,
        batch_size=2,
    )
    assert sample.prompts == [enc.prompt_ids(turns[:-1]) for turns in CONVERSATIONS]
    assert sample.references == ["Rome.", "#### 8"]
    assert sample.prompt_texts[0].endswith("And of Italy?<|im_end|>\n<|im_start|>assistant\n")


def test_evaluation_data_of_token_rows(tokenizer):
    """CausalLM.evaluation_data: longest-first batches of the rows and the generation sample
    of ``train.generation``, run through ``evaluate`` on a tiny Llama of SmolLM2's vocab."""
    from lepton_ray.config import validate_experiment

    enc = ChatEncoder(tokenizer, 256, False, "drop")
    encoded = [enc.encode(turns) for turns in CONVERSATIONS]
    lengths = [len(ids) for ids, _, _ in encoded]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = TokenRows(
        np.concatenate([ids for ids, _, _ in encoded]).astype(np.int32),
        offsets,
        np.concatenate([np.stack([lab, p], axis=1) for _, lab, p in encoded]).astype(np.int32),
    )
    cfg = validate_experiment(
        {
            "name": "chat",
            "task": "causal_lm",
            "data": {"path": "/nonexistent/chat.jsonl", "max_length": 256},
            "model": {"name": "smollm2", "random_init": True},
            "train": {"generation": {"samples": 1, "max_new_tokens": 3, "scorer": "gsm8k"}},
            "tune": {"metric": "val_loss", "mode": "min"},
        },
        check_files=False,
    )
    pad = tokenizer.pad_token_id
    data = CausalLM().evaluation_data(rows, 1, pad, tokenizer, cfg)
    assert [int(b["attention_mask"].sum()) for b in data.batches] == sorted(lengths, reverse=True)
    sample = data.generation
    assert len(sample.prompts) == 1 and sample.references == ["Rome."]
    assert sample.scorer == "gsm8k" and sample.max_new_tokens == 3
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in sample.stop_ids

    model = _llama(vocab=len(tokenizer), pad=pad)
    with torch.no_grad():
        result = CausalLM().evaluate(model, data, [])
    assert result["tokens"] == trained_tokens(rows.targets_of(range(len(rows))))
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    (row,) = result["generations"]
    assert row["reference"] == "Rome." and row["prompt"] == sample.prompt_texts[0]
    assert "gsm8k" in row and math.isfinite(result["gsm8k"])
    assert "val_rouge_l" in CausalLM().summary(result)

    no_generation = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(
                update={"generation": cfg.train.generation.model_copy(update={"samples": 0})}
            )
        }
    )
    assert CausalLM().evaluation_data(rows, 2, pad, tokenizer, no_generation).generation is None
