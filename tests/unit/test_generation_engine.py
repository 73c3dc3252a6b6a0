"""The CPU generation engine (``serve/engine.py``) on a tiny random Llama with SmolLM2's
tokenizer: continuous batching gives every sequence what it gets alone, sequences join and
leave mid-flight, text streams as it is generated, stop strings and stop tokens end a
sequence, a seed makes sampling repeatable, and a cancelled sequence leaves the batch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lepton_ray.serve.engine import Engine, SamplingParams, held_back, sample, text_of
from lepton_ray.tasks.causal_lm_eval import generate

PROMPTS = [[1, 17, 300, 4000], [1, 9, 8, 7, 6, 5, 4, 3, 2, 10, 11], [1, 500], [1, 2, 3, 4, 5, 6]]


@pytest.fixture(scope="module")
def lm(smollm2_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def _engine(lm, max_batch_size=2, stop_ids=(), max_context=64):
    model, tokenizer = lm
    return Engine(model, tokenizer, stop_ids, tokenizer.eos_token_id, max_context, max_batch_size)


async def _collect(engine, seq):
    return [event async for event in engine.events(seq)]


def _run(engine, jobs):
    """Submit (prompt, params) pairs at once and collect every sequence's events."""

    async def main():
        seqs = [engine.submit(p, params) for p, params in jobs]
        return seqs, await asyncio.gather(*(_collect(engine, s) for s in seqs))

    return asyncio.run(main())


def _alone(lm, prompt, max_tokens):
    model, tokenizer = lm
    with torch.inference_mode():
        [(tokens, _)] = generate(model, [prompt], [], tokenizer.eos_token_id, max_tokens, "cpu")
    return tokens


def test_continuous_batching_gives_each_sequence_what_it_gets_alone(lm):
    """Two rows at a time for four sequences of other lengths and budgets: the short ones
    leave early and the waiting ones join a batch already decoding."""
    engine = _engine(lm, max_batch_size=2)
    budgets = [3, 12, 5, 9]
    jobs = [(p, SamplingParams(max_tokens=n, temperature=0.0)) for p, n in zip(PROMPTS, budgets)]
    seqs, events = _run(engine, jobs)
    for seq, budget, prompt, evs in zip(seqs, budgets, PROMPTS, events):
        assert seq.tokens == _alone(lm, prompt, budget)
        assert evs[-1].finish_reason == "length" and evs[-1].completion_tokens == budget
        text = "".join(e.text for e in evs)
        assert text == lm[1].decode(seq.tokens, skip_special_tokens=True)
    assert engine.stats.prefills >= 3  # sequences 3 and 4 joined later, not all at once
    assert max(engine.stats.batch_rows / engine.stats.steps, 0) <= 2
    assert not engine.running and not engine.waiting


def test_text_streams_token_by_token(lm):
    engine = _engine(lm, max_batch_size=4)
    seqs, [events] = _run(engine, [(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0.0))])
    assert len(events) >= 5  # not one event at the end
    assert [e.completion_tokens for e in events] == sorted(e.completion_tokens for e in events)


def test_a_stop_string_cuts_the_text_before_it(lm):
    engine = _engine(lm, max_batch_size=4)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    _, [events] = _run(engine, [(PROMPTS[1], params)])
    full = "".join(e.text for e in events)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    _, [cut] = _run(_engine(lm), [(PROMPTS[1], SamplingParams(16, 0.0, stop=(stop,)))])
    assert "".join(e.text for e in cut) == full[: full.find(stop)]
    assert cut[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in cut)


def test_a_stop_token_ends_the_sequence_and_is_counted(lm):
    first = _alone(lm, PROMPTS[2], 6)
    engine = _engine(lm, stop_ids=[first[3]])
    seqs, [events] = _run(engine, [(PROMPTS[2], SamplingParams(max_tokens=6, temperature=0.0))])
    stop_at = first.index(first[3])
    assert seqs[0].tokens == first[:stop_at]
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == stop_at + 1


def test_the_context_limit_ends_a_sequence_with_length(lm):
    engine = _engine(lm, max_context=len(PROMPTS[1]) + 3)
    seqs, [events] = _run(engine, [(PROMPTS[1], SamplingParams(max_tokens=50, temperature=0.0))])
    assert len(seqs[0].tokens) == 3 and events[-1].finish_reason == "length"


def test_a_seed_makes_sampling_repeatable(lm):
    def texts(seed):
        params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=seed)
        seqs, _ = _run(_engine(lm, 4), [(PROMPTS[0], params), (PROMPTS[3], params)])
        return [s.tokens for s in seqs]

    assert texts(7) == texts(7)
    assert texts(7) != texts(8)


def test_a_cancelled_sequence_leaves_and_the_others_finish(lm):
    engine = _engine(lm, max_batch_size=4)

    async def main():
        keep = engine.submit(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0.0))
        gone = engine.submit(PROMPTS[1], SamplingParams(max_tokens=40, temperature=0.0))
        stream = engine.events(gone)
        await stream.__anext__()  # its first text arrived: it is decoding
        await stream.aclose()  # the client went away
        events = await _collect(engine, keep)
        return keep, gone, events

    keep, gone, events = asyncio.run(main())
    assert gone.finish_reason == "cancelled" and len(gone.tokens) < 40
    assert keep.tokens == _alone(lm, PROMPTS[0], 12) and events[-1].finish_reason == "length"
    assert not engine.running


def test_held_back_keeps_what_may_begin_a_stop_string():
    assert held_back("Hello wor", ["world"]) == 3
    assert held_back("Hello", ["\n\n", "END"]) == 0
    assert held_back("Hello\n", ["\n\n"]) == 1


def test_nucleus_sampling_never_picks_outside_the_nucleus():
    logits = torch.tensor([5.0, 4.9, 0.0, -1.0, -3.0])
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5)
    assert {sample(logits, params, gen) for _ in range(200)} <= {0, 1}
    assert sample(logits, SamplingParams(max_tokens=1, temperature=0.0), gen) == 0


def test_offline_generate_gives_what_the_streams_give(lm):
    params = SamplingParams(6, temperature=0.9, top_p=0.95, seed=11)
    seqs, streams = _run(_engine(lm, max_batch_size=2), [(p, params) for p in PROMPTS])
    offline = _engine(lm, max_batch_size=3).generate(PROMPTS, params)
    assert [text_of(s) for s in offline] == ["".join(e.text for e in ev) for ev in streams]
    assert [s.finish_reason for s in offline] == [s.finish_reason for s in seqs]
    assert all(s.completion_tokens == 6 for s in offline)


def test_a_stream_waiting_for_its_next_token_is_cancellable(lm):
    """A request task parked between tokens must take a cancellation (Ray Serve cancels the
    task of a request whose client went away) and leave the batch."""

    async def main():
        engine = _engine(lm, max_batch_size=2, max_context=10_000)
        seq = engine.submit(PROMPTS[0], SamplingParams(5000, temperature=0))
        reader = asyncio.ensure_future(_collect(engine, seq))
        while seq.completion_tokens < 3:
            await asyncio.sleep(0.01)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        while engine.running:
            await asyncio.sleep(0.01)
        return seq

    seq = asyncio.run(main())
    assert seq.cancelled and seq.finish_reason == "cancelled" and seq.completion_tokens < 5000
