"""A generation engine for CPUs (and any device torch runs on) with iteration-level batching.

Ray Serve's own LLM path (``ray.serve.llm``) needs vLLM and a GPU; this engine serves a
causal LM that lepton-ray trained, anywhere. It knows nothing of HTTP or Ray:

- every request is a ``Sequence`` of prompt token ids and ``SamplingParams``; ``submit``
  queues it and ``events`` yields its text as it is generated (``Event``);
- one loop runs the model for every sequence at once. At each step it first admits
  waiting sequences (up to ``max_batch_size`` in all) and prefills them together, padded on
  the left, then decodes one token for every running sequence. A finished or cancelled
  sequence leaves the batch at the next step and a waiting one takes its place (continuous
  batching); each sequence keeps its own rows of the KV cache, and its own positions;
- sampling is per sequence: greedy at temperature 0, else temperature and nucleus (top_p)
  sampling from its own ``torch.Generator`` (a ``seed`` makes it repeatable);
- a sequence ends on a stop token (the artifact's ``stop_token_ids``), on a stop string
  (the text is cut before it, and text that may begin one is held back until it is
  decided), at ``max_tokens`` or at the model's context (``length``);
- text is decoded incrementally: an incomplete UTF-8 character is never sent half.

The loop runs on the caller's event loop (one step at a time, yielding between steps), so
an HTTP server keeps answering between forward passes; ``step`` can also be driven by hand.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import random
import time
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
POLL_S = 0.004  # how often a waiting stream looks for its next event


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Event:
    """New text of one sequence; ``finish_reason`` is set on its last event."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    queue: collections.deque = field(default_factory=collections.deque)
    tokens: list[int] = field(default_factory=list)
    completion_tokens: int = 0  # tokens generated, the stop token included
    sent: int = 0  # characters of the text already sent
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # time to its first token


@dataclass
class EngineStats:
    steps: int = 0
    prefills: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    batch_rows: int = 0  # summed over decode steps: / steps = mean batch size


def held_back(text: str, stops: Seq[str]) -> int:
    """How many characters at the end of ``text`` may still begin a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token of a row of logits: greedy at temperature 0, else nucleus sampling."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        ordered, index = torch.sort(probs, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the tokens ranked above
        ordered = torch.where(before < params.top_p, ordered, torch.zeros_like(ordered))
        probs = torch.zeros_like(probs).scatter(0, index, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class Engine:
    """Continuous batching over one model (see the module's docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        stop_token_ids: Seq[int],
        pad_id: int,
        max_context: int,
        max_batch_size: int = 8,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(int(t) for t in stop_token_ids)
        self.pad_id = int(pad_id)
        self.max_context = int(max_context)
        self.max_batch_size = int(max_batch_size)
        self.device = next(model.parameters()).device
        # transformers 5.25 renamed past_key_values to cache (the old name warns).
        forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # (keys, values) per layer
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self._positions = torch.zeros(0, dtype=torch.long)  # of each row's next token
        self._last = torch.zeros(0, dtype=torch.long)  # each row's last token
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: Seq[int], params: SamplingParams) -> Sequence:
        """Queue a sequence; the engine's loop (started on first use) generates it."""
        seq = self._sequence(prompt, params)
        self.waiting.append(seq)
        self._ensure_loop()
        return seq

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams) -> list[Sequence]:
        """Offline: every prompt to its end, the loop driven here (no event loop needed);
        each sequence's whole text is ``text_of(seq)``. The endpoint's batching, sampling
        and stops, so a seeded request gives the same text both ways."""
        seqs = [self._sequence(prompt, params) for prompt in prompts]
        self.waiting.extend(seqs)
        while self.waiting or self.running:
            self.step()
        return seqs

    @staticmethod
    def _sequence(prompt: Seq[int], params: SamplingParams) -> Sequence:
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        return Sequence(list(prompt), params, torch.Generator().manual_seed(seed))

    async def events(self, seq: Sequence) -> AsyncIterator[Event]:
        """The sequence's events until its last; leaving early cancels it."""
        try:
            while True:
                while not seq.queue:
                    # A timed sleep, not a future the loop's task resolves: Ray Serve cancels
                    # a request whose client went away by cancelling its task, and a task
                    # parked on such a future was never woken (Ray 2.60, measured: the
                    # generation ran to its end); a sleeping one is.
                    await asyncio.sleep(POLL_S)
                event = seq.queue.popleft()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if seq.finish_reason is None:
                self.cancel(seq)

    def cancel(self, seq: Sequence) -> None:
        """Stop generating for ``seq`` (its client went away); it leaves at the next step."""
        seq.cancelled = True
        if seq in self.waiting:
            self.waiting.remove(seq)
            seq.finish_reason = CANCELLED

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ the loop
    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._run())
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.step()
            await asyncio.sleep(0)  # let the server send what was generated

    def step(self) -> None:
        """Admit and prefill waiting sequences, then decode one token for every row."""
        fresh: list[Sequence] = []
        try:
            with torch.inference_mode():
                self._drop([s for s in self.running if s.cancelled or s.finish_reason])
                while self.waiting and len(self.running) + len(fresh) < self.max_batch_size:
                    seq = self.waiting.popleft()
                    if not seq.cancelled:
                        fresh.append(seq)
                if fresh:
                    self._prefill(fresh)
                self._drop([s for s in self.running if s.finish_reason])
                if self.running:
                    self._decode()
                    self._drop([s for s in self.running if s.finish_reason])
        except Exception as err:  # noqa: BLE001 - every sequence in the batch learns why
            failed = self.running + [s for s in fresh if s not in self.running]
            for seq in failed:
                self._finish(seq, ERROR, error=f"{type(err).__name__}: {err}")
            self._reset()

    # ------------------------------------------------------------------ model steps
    def _forward(self, ids, mask, positions, cache):
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **{self._cache_arg: cache},
        )
        return out.logits[:, -1, :].float().cpu(), getattr(out, self._cache_arg)

    def _prefill(self, fresh: list[Sequence]) -> None:
        from transformers import DynamicCache

        width = max(len(s.prompt) for s in fresh)
        ids = torch.full((len(fresh), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(fresh), width), dtype=torch.long)
        for row, seq in enumerate(fresh):
            ids[row, width - len(seq.prompt) :] = torch.tensor(seq.prompt, dtype=torch.long)
            mask[row, width - len(seq.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, DynamicCache())
        self.stats.prefills += 1
        self.stats.prompt_tokens += int(mask.sum())
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        self._merge(layers, mask, torch.tensor([len(s.prompt) for s in fresh]))
        self.running.extend(fresh)
        rows = range(len(self.running) - len(fresh), len(self.running))
        self._emit(rows, logits)

    def _decode(self) -> None:
        from transformers import DynamicCache

        self._mask = torch.cat(
            [self._mask, torch.ones((len(self.running), 1), dtype=torch.long)], 1
        )
        cache = DynamicCache(ddp_cache_data=self._layers)
        logits, cache = self._forward(
            self._last[:, None], self._mask, self._positions[:, None], cache
        )
        self._layers = [(layer.keys, layer.values) for layer in cache.layers]
        self._positions = self._positions + 1
        self.stats.steps += 1
        self.stats.batch_rows += len(self.running)
        self._emit(range(len(self.running)), logits)

    def _merge(self, layers, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Append prefilled rows to the batch, left-padding whichever side is shorter."""
        if not self.running:
            self._layers, self._mask, self._positions = layers, mask, positions
            self._last = torch.zeros(len(positions), dtype=torch.long)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._layers = [
            (
                torch.cat([_left_pad(k0, width, 2), _left_pad(k1.to(k0.dtype), width, 2)], 0),
                torch.cat([_left_pad(v0, width, 2), _left_pad(v1.to(v0.dtype), width, 2)], 0),
            )
            for (k0, v0), (k1, v1) in zip(self._layers, layers, strict=True)
        ]
        self._mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)], 0)
        self._positions = torch.cat([self._positions, positions])
        self._last = torch.cat([self._last, torch.zeros(len(positions), dtype=torch.long)])

    def _drop(self, gone: list[Sequence]) -> None:
        """Remove finished rows from the batch, and the padding columns no row needs."""
        if not gone:
            return
        for seq in gone:
            if seq.finish_reason is None:
                self._finish(seq, CANCELLED)
        keep = [i for i, s in enumerate(self.running) if s not in gone]
        self.running = [self.running[i] for i in keep]
        if not self.running:
            self._reset()
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask = self._mask[index]
        unused = int((mask.cumsum(1) == 0).sum(1).min())  # left padding common to every row
        self._mask = mask[:, unused:]
        self._layers = [
            (k[index.to(k.device), :, unused:], v[index.to(v.device), :, unused:])
            for k, v in self._layers
        ]
        self._positions = self._positions[index]
        self._last = self._last[index]

    def _reset(self) -> None:
        self.running = []
        self._layers = []
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self._positions = torch.zeros(0, dtype=torch.long)
        self._last = torch.zeros(0, dtype=torch.long)

    # ------------------------------------------------------------------ tokens -> text
    def _emit(self, rows, logits: torch.Tensor) -> None:
        now = time.perf_counter()
        for k, row in enumerate(rows):  # logits[k] is row ``row``'s
            seq = self.running[row]
            token = sample(logits[k], seq.params, seq.generator)
            self._last[row] = token
            seq.completion_tokens += 1
            self.stats.generated_tokens += 1
            if seq.first_token_s is None:
                seq.first_token_s = now - seq.submitted
            if token in self.stop_ids:
                self._finish(seq, STOP)
                continue
            seq.tokens.append(token)
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
            cut = min(
                (i for i in (text.find(s) for s in seq.params.stop if s) if i >= 0), default=-1
            )
            if cut >= 0:
                self._finish(seq, STOP, text[:cut])
            elif len(seq.tokens) >= min(seq.params.max_tokens, self.max_context - len(seq.prompt)):
                self._finish(seq, LENGTH, text)
            elif not text.endswith("\ufffd"):  # never half a character
                ready = len(text) - held_back(text, seq.params.stop)
                if ready > seq.sent:
                    seq.queue.append(Event(text[seq.sent : ready], seq.completion_tokens))
                    seq.sent = ready

    def _finish(self, seq: Sequence, why: str, text: str | None = None, error=None) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = why
        if text is None:
            # Never half a character, whether or not the request has stop strings: the
            # tokens of a character cut by the stop token or the length limit are dropped.
            text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True).rstrip("\ufffd")
        rest = text[seq.sent :] if why in (STOP, LENGTH) else ""
        seq.sent = max(seq.sent, len(text))
        seq.queue.append(Event(rest, seq.completion_tokens, why, error))


def text_of(seq: Sequence) -> str:
    """The text a finished sequence generated (its events' text, for offline use)."""
    return "".join(event.text for event in seq.queue)


def artifact_engine(model, tokenizer, meta: Any, max_batch_size: int) -> Engine:
    """An engine over a loaded model artifact: its stop tokens (``meta.extra["chat"]``),
    pad token and context (the endpoint and offline prediction both build theirs here)."""
    model.eval()
    pad = tokenizer.pad_token_id
    return Engine(
        model,
        tokenizer,
        meta.extra["chat"]["stop_token_ids"],
        pad if pad is not None else 0,
        context_limit(model, meta),
        max_batch_size,
    )


def context_limit(model, meta: Any) -> int:
    """The longest prompt plus completion the model takes: its positions, else max_length."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(positions or meta.max_length)
