"""Examples of a causal language model: reading them, rendering them through a chat template,
and the loss mask of their tokens.

Every example becomes a list of turns ``{"role", "content"}`` (the row's ``text``, as
canonical JSON, is what is cleaned, deduplicated and split on):

- ``alpaca`` and ``messages``: ``system``/``user``/``assistant`` turns, rendered through the
  chat template (the tokenizer's own, a named one, or a Jinja string);
- ``prompt_completion``: a ``prompt`` and a ``completion`` turn, joined as they are;
- ``text``: one ``text`` turn (continued pre-training).

:class:`ChatEncoder` renders an example once and tokenizes the rendering once; the tokens of
each assistant turn are found by the characters of the rendering they start in (each turn's
span is where the rendering of the conversation up to it, with the generation prompt, ends,
to where the rendering with it ends). The same encoder renders a prompt for generation from
the template in the model artifact, so training and serving see the same token ids.

Pure Python and transformers: no Ray.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from lepton_ray.errors import DataError

KEPT = ""
"""The drop reason of a kept row (``data.clean.KEEP``; tasks cannot import the data stage)."""
IGNORE = -100
"""Label of a position that is not trained on (prompt, system, template, padding)."""
CONTEXT, RESPONSE, LAST_RESPONSE = 0, 1, 2
"""Parts of a token: the context, an assistant turn, the last assistant turn (the reference
the generation evaluation compares with)."""
RAW_ROLES = ("prompt", "completion", "text")
TEMPLATED_FORMATS = ("alpaca", "messages")
"""Formats rendered through the chat template (the others are joined as they are)."""
CHAT_ROLES = ("system", "user", "assistant")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "alpaca": ALPACA}
"""Templates ``data.chat.template`` may name (ChatML needs <|im_start|>/<|im_end|> tokens)."""


class TemplateError(ValueError):
    """The chat template cannot render the conversations as training needs."""


# ------------------------------------------------------------------------------ reading rows
def canonical(turns: Sequence[Mapping[str, str]]) -> str:
    """The one JSON spelling of an example (dedup, split and the files hold it)."""
    return json.dumps(
        [{"role": t["role"], "content": t["content"]} for t in turns],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def parse(text: str) -> list[dict[str, str]]:
    """The turns of a row's ``text`` (written by :func:`canonical`)."""
    return json.loads(text)


def prompt_of(turns: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The turns before the last response: what a model is asked (the key of a split and of
    contamination, so one prompt never lands in two splits)."""
    last = max(
        (i for i, t in enumerate(turns) if t["role"] in ("assistant", "completion")),
        default=len(turns),
    )
    return [dict(t) for t in turns[:last]]


def _blank(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and value != value)
        or (isinstance(value, str) and not value.strip())
    )


def row_turns(
    row: Mapping[str, Any], chat, where: str, answer: bool = True
) -> list[dict[str, str]] | None:
    """One source row -> its turns; None when a required field is missing (counted as
    ``missing_text``); a ``DataError`` naming ``where`` for a malformed conversation.
    ``answer=False`` (prompts to generate for): the answer (output, completion, an
    assistant turn) may be missing."""
    cols = chat.columns
    system = row.get(cols.system) if cols.system else None
    system = None if _blank(system) else str(system)
    if chat.format == "text":
        value = row.get(cols.text)
        return None if _blank(value) else [{"role": "text", "content": str(value)}]
    if chat.format == "prompt_completion":
        prompt, completion = row.get(cols.prompt), row.get(cols.completion)
        if _blank(prompt) or (answer and _blank(completion)):
            return None
        turns = [{"role": "prompt", "content": str(prompt)}]
        if not _blank(completion):
            turns.append({"role": "completion", "content": str(completion)})
        return turns
    if chat.format == "alpaca":
        instruction, extra, output = (
            row.get(cols.instruction),
            row.get(cols.input),
            row.get(cols.output),
        )
        if _blank(instruction) or (answer and _blank(output)):
            return None
        user = str(instruction) if _blank(extra) else f"{instruction}\n\n{extra}"
        turns = [{"role": "user", "content": user}]
        if not _blank(output):
            turns.append({"role": "assistant", "content": str(output)})
    else:
        turns = _message_turns(row.get(cols.messages), chat, where, answer)
    if system is None and chat.system_prompt and turns[0]["role"] != "system":
        system = chat.system_prompt
    if system is not None and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system})
    return turns


def _message_turns(value: Any, chat, where: str, answer: bool = True) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(
                f"{where}: column '{chat.columns.messages}' is not a JSON list"
            ) from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: column '{chat.columns.messages}' must hold a non-empty list of turns, "
            f"got {type(value).__name__}"
        )
    names = chat.role_names()
    turns = []
    for k, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: turn {k} is not an object ({type(turn).__name__})")
        raw_role = turn.get(chat.role_key)
        role = names.get(str(raw_role).strip().lower()) if raw_role is not None else None
        if role is None:
            raise DataError(
                f"{where}: turn {k} has the unknown role {raw_role!r}; known roles are "
                f"{sorted(names)} (map others with data.chat.roles, and data.chat.role_key/"
                "content_key for ShareGPT's from/value)"
            )
        content = turn.get(chat.content_key)
        if _blank(content):
            raise DataError(f"{where}: turn {k} ({role}) has an empty '{chat.content_key}'")
        turns.append({"role": role, "content": str(content)})
    if any(t["role"] == "system" for t in turns[1:]):
        raise DataError(f"{where}: a system turn may only come first")
    if answer and not any(t["role"] == "assistant" for t in turns):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    return turns


# ------------------------------------------------------------------------------ templates
def resolve_template(tokenizer, setting: str) -> str | None:
    """The Jinja source ``data.chat.template`` names: the tokenizer's own ('tokenizer'; None
    if it has none), a named template, or the string itself."""
    if setting == "tokenizer":
        return getattr(tokenizer, "chat_template", None) or None
    if setting in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[setting]
    if "{%" not in setting and "{{" not in setting:
        raise TemplateError(
            f"data.chat.template '{setting}' is neither 'tokenizer', a named template "
            f"({', '.join(NAMED_TEMPLATES)}) nor a Jinja template"
        )
    return setting


def template_digest(template: str | None) -> str:
    return hashlib.sha256((template or "").encode()).hexdigest()[:16]


def install_template(tokenizer, setting: str, needs_template: bool) -> str | None:
    """Put the configured template on ``tokenizer`` (so ``save_pretrained`` writes it into the
    artifact) and check that it renders; returns it. ``needs_template``: the format is
    rendered as a chat (alpaca, messages)."""
    template = resolve_template(tokenizer, setting)
    if needs_template and template is None:
        raise TemplateError(
            "the model's tokenizer has no chat template; set data.chat.template to a named "
            f"one ({', '.join(NAMED_TEMPLATES)}) or to a Jinja string"
        )
    if template is not None:
        tokenizer.chat_template = template
        if needs_template:
            probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
            rendered = render(tokenizer, probe)
            prefix = render(tokenizer, probe[:1], generation_prompt=True)
            if not rendered.startswith(prefix) or "Hello" not in rendered[len(prefix) :]:
                raise TemplateError(
                    "the chat template does not render a conversation as its prefix with the "
                    "generation prompt followed by the answer; its loss mask cannot be found"
                )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return template


def render(tokenizer, turns: Sequence[Mapping[str, str]], generation_prompt: bool = False) -> str:
    """The template's text of a conversation; a ``TemplateError`` if the template raises."""
    try:
        return tokenizer.apply_chat_template(
            [dict(t) for t in turns], tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # noqa: BLE001 - jinja raises anything a template does
        raise TemplateError(f"the chat template failed: {type(err).__name__}: {err}") from None


# ------------------------------------------------------------------------------ encoding
class ChatEncoder:
    """Examples -> token ids, labels (:data:`IGNORE` where not trained) and parts.

    ``tokenizer`` has the template installed (:func:`install_template`). ``too_long``: what
    happens to an example over ``max_length`` tokens: ``drop`` (None comes back, with the
    reason) or ``truncate_prompt`` (the context loses its first tokens; an example whose
    last response alone is too long is still dropped).
    """

    def __init__(self, tokenizer, max_length: int, train_on_prompt: bool, too_long: str):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_on_prompt = train_on_prompt
        self.too_long = too_long
        self.eos_id = tokenizer.eos_token_id
        self.eos = tokenizer.eos_token or ""

    def encode(self, turns: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int], list[int]]:
        """(ids, labels, parts) of a whole example, untruncated."""
        if turns[0]["role"] in RAW_ROLES:
            return self._encode_raw(turns)
        full = render(self.tokenizer, turns)
        spans = []
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            start = len(render(self.tokenizer, turns[:i], generation_prompt=True))
            upto = render(self.tokenizer, turns[: i + 1])
            if not full.startswith(upto) or len(upto) <= start:
                raise TemplateError(
                    "the chat template renders an earlier part of a conversation differently "
                    "from the whole; its loss mask cannot be found"
                )
            spans.append((start, len(upto)))
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        parts = [CONTEXT] * len(ids)
        last = len(spans) - 1
        for j, (begin, _) in enumerate(enc["offset_mapping"]):
            for k, (start, end) in enumerate(spans):
                if start <= begin < end:
                    parts[j] = LAST_RESPONSE if k == last else RESPONSE
                    break
        return ids, self._labels(ids, parts), parts

    def _encode_raw(self, turns) -> tuple[list[int], list[int], list[int]]:
        tok = self.tokenizer
        if turns[0]["role"] == "text":
            ids = tok(turns[0]["content"], add_special_tokens=True)["input_ids"] + [self.eos_id]
            parts = [RESPONSE] * len(ids)
        else:
            prompt = tok(turns[0]["content"], add_special_tokens=True)["input_ids"]
            answer = tok(turns[1]["content"], add_special_tokens=False)["input_ids"]
            ids = prompt + answer + [self.eos_id]
            parts = [CONTEXT] * len(prompt) + [LAST_RESPONSE] * (len(answer) + 1)
        return ids, self._labels(ids, parts), parts

    def _labels(self, ids: list[int], parts: list[int]) -> list[int]:
        if self.train_on_prompt:
            return list(ids)
        return [t if p != CONTEXT else IGNORE for t, p in zip(ids, parts)]

    def fit(self, ids, labels, parts):
        """Apply the ``too_long`` policy at ``max_length`` (``fit_example``)."""
        return fit_example(ids, labels, parts, self.max_length, self.too_long)

    def prompt_ids(self, turns: Sequence[Mapping[str, str]]) -> list[int]:
        """The token ids a model generates from: a conversation (ending with a user turn)
        rendered with the generation prompt, or a raw prompt."""
        if turns and turns[0]["role"] in RAW_ROLES:
            return self.tokenizer(turns[0]["content"], add_special_tokens=True)["input_ids"]
        text = render(self.tokenizer, turns, generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_example(ids, labels, parts, max_length: int, too_long: str):
    """An example as it is trained on at ``max_length`` tokens under the ``too_long`` policy,
    or None and the reason it is dropped (``too_long_tokens``; ``response_too_long`` when
    cutting the prompt cannot help). A plain text (all one response) is cut at its end."""
    n = len(ids)
    if n <= max_length:
        return (ids, labels, parts), None
    if too_long == "drop":
        return None, "too_long_tokens"
    if len(parts) and all(p == RESPONSE for p in parts):
        return (ids[:max_length], labels[:max_length], parts[:max_length]), None
    first = next((j for j, p in enumerate(parts) if p == LAST_RESPONSE), n)
    cut = n - max_length
    if cut > first:
        return None, "response_too_long"
    return (ids[cut:], labels[cut:], parts[cut:]), None


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end an answer: EOS, and the template's end-of-turn token if it has one."""
    ids = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        found = tokenizer.convert_tokens_to_ids(name)
        if isinstance(found, int) and found != tokenizer.unk_token_id and found >= 0:
            ids.add(found)
    return sorted(i for i in ids if i is not None)
