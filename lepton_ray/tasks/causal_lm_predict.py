"""A causal language model's answers: prompts (text or message lists) rendered from the
artifact's own chat template (checked against the digest it was trained with: fail
closed), greedy generation, and the MLflow pyfunc's signature and table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from lepton_ray.errors import StageError
from lepton_ray.tasks.chat import TEMPLATED_FORMATS, ChatEncoder, template_digest

DEFAULT_MAX_NEW_TOKENS = 128


def prompt_turns(task, meta, prompt: Any) -> list[dict[str, str]]:
    """A prompt as turns: a list of ``{role, content}`` (or its JSON), or plain text (one
    user turn; the raw prompt of a prompt_completion/text model)."""
    chat = (meta.extra or {}).get("chat", {})
    if isinstance(prompt, str) and prompt.lstrip().startswith("["):
        with suppress(json.JSONDecodeError):
            prompt = json.loads(prompt)
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if isinstance(prompt, list):
        if chat.get("format") not in TEMPLATED_FORMATS:
            raise ValueError("this model takes plain-text prompts, not message lists")
        turns = []
        for k, turn in enumerate(prompt):
            if not isinstance(turn, dict) or turn.get("role") not in (
                "system",
                "user",
                "assistant",
            ):
                raise ValueError(f"message {k} needs a role of system, user or assistant")
            if not isinstance(turn.get("content"), str) or not turn["content"].strip():
                raise ValueError(f"message {k} has an empty content")
            _check_unicode(turn["content"], f"message {k}")
            turns.append({"role": turn["role"], "content": turn["content"]})
        if not turns or turns[-1]["role"] == "assistant":
            raise ValueError("the messages must end with a user turn")
        return turns
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("a prompt must be a non-empty string or a list of messages")
    _check_unicode(prompt, "the prompt")
    if chat.get("format") in TEMPLATED_FORMATS:
        return [{"role": "user", "content": prompt}]
    return [{"role": "prompt", "content": prompt}]


def _check_unicode(text: str, what: str) -> None:
    """JSON admits lone surrogates (``"\\ud800"``); no tokenizer does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} holds {text[err.start : err.end]!a} at character {err.start}, which is "
            "not valid Unicode (a lone surrogate)"
        ) from None


def check_tokenizer(task, tokenizer, meta) -> None:
    """Fail closed: the artifact's tokenizer must carry the template it was trained with."""
    chat = (meta.extra or {}).get("chat")
    if chat is None:
        raise StageError("the artifact records no chat settings (lepton_model.json extra.chat)")
    found = template_digest(getattr(tokenizer, "chat_template", None))
    if chat.get("has_template") and found != chat.get("template_sha"):
        raise StageError(
            "the artifact's chat template differs from the one it was trained with "
            f"(sha {found} != {chat.get('template_sha')}); refusing to render prompts"
        )


def prompt_ids(task, tokenizer, meta, prompt: Any) -> list[int]:
    """A prompt's token ids as the model was trained to continue them: its turns cleaned
    as in training and rendered by the artifact's own template, generation prompt added.
    Batch prediction, the pyfunc and the Serve endpoint all render through here."""
    from lepton_ray.text import clean_turns

    turns = task.prompt_turns(meta, prompt)
    cleaned = clean_turns([t["content"] for t in turns], meta.cleaning)
    turns = [{**t, "content": c} for t, c in zip(turns, cleaned)]
    return ChatEncoder(tokenizer, meta.max_length, False, "truncate_prompt").prompt_ids(turns)


def generate_answers(
    task,
    model,
    tokenizer,
    meta,
    prompts: Sequence[Any],
    max_new_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Greedy answers to ``prompts`` rendered from the artifact's own template."""
    import torch

    from lepton_ray.tasks.causal_lm_eval import generate

    task.check_tokenizer(tokenizer, meta)
    chat = meta.extra["chat"]
    limit = int(max_new_tokens or chat.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    encoded, truncated = [], []
    for prompt in prompts:
        ids = prompt_ids(task, tokenizer, meta, prompt)
        room = max(1, meta.max_length - 1)
        truncated.append(len(ids) > room)
        encoded.append(ids[-room:])
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        results = generate(model, encoded, chat["stop_token_ids"], pad, limit, device)
    out = []
    for ids, (tokens, why), cut in zip(encoded, results, truncated, strict=True):
        out.append(
            {
                "text": tokenizer.decode(tokens, skip_special_tokens=True),
                "finish_reason": why,
                "prompt_tokens": len(ids),
                "completion_tokens": len(tokens) + (1 if why == "stop" else 0),
                "truncated": bool(cut),
            }
        )
    return out


def pyfunc_signature(task, labels: Sequence[str]):
    """In: ``prompt`` (a string) or ``messages`` (a list of ``{role, content}``), one
    per row; the parameter ``max_new_tokens``. Out: the generated text and its counts."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    turn = Object([Property("role", DataType.string), Property("content", DataType.string)])
    inputs = Schema(
        [
            ColSpec(DataType.string, "prompt", required=False),
            ColSpec(Array(turn), "messages", required=False),
        ]
    )
    columns = task.prediction_schema(labels)
    outputs = Schema([ColSpec(getattr(DataType, kind), name) for name, kind in columns])
    params = ParamSchema([ParamSpec("max_new_tokens", DataType.long, DEFAULT_MAX_NEW_TOKENS)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pyfunc_predict(task, model, tokenizer, meta, model_input, params: dict[str, Any]):
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        prompts = []
        for i in range(len(model_input)):
            messages = model_input["messages"].iloc[i] if "messages" in model_input else None
            if messages is not None and not (isinstance(messages, float) and messages != messages):
                prompts.append(list(messages))
            elif "prompt" in model_input and isinstance(model_input["prompt"].iloc[i], str):
                prompts.append(model_input["prompt"].iloc[i])
            else:
                raise ValueError(f"row {i} has neither a prompt nor messages")
    elif isinstance(model_input, str):
        prompts = [model_input]
    else:
        prompts = list(model_input)
    limit = params.get("max_new_tokens")
    answers = []
    for start in range(0, len(prompts), 8):
        answers.extend(
            task.generate_answers(model, tokenizer, meta, prompts[start : start + 8], limit)
        )
    columns = [name for name, _ in task.prediction_schema(meta.labels)]
    return pd.DataFrame([task.prediction_row(a) for a in answers], columns=columns)
