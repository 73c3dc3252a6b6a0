"""``data.chat`` and ``train.generation``: how a causal language model's examples are read,
rendered through a chat template, masked and scored by generation (``task: causal_lm``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from lepton_ray.config.base import Section

CHAT_FORMATS = ("alpaca", "messages", "prompt_completion", "text")
CHAT_ROLES = ("system", "user", "assistant")


class ChatColumns(Section):
    """The source's column of each field (only the chosen format's are read)."""

    instruction: str = Field("instruction", description="alpaca: the instruction.")
    input: str = Field("input", description="alpaca: the optional input (blank: none).")
    output: str = Field("output", description="alpaca: the response.")
    messages: str = Field("messages", description="messages: the list of turns.")
    prompt: str = Field("prompt", description="prompt_completion: the prompt.")
    completion: str = Field("completion", description="prompt_completion: the completion.")
    text: str = Field("text", description="text: the document (continued pre-training).")
    system: str | None = Field(
        None, description="alpaca/messages: a column with each row's system message, if any."
    )


class ChatConfig(Section):
    format: Literal["alpaca", "messages", "prompt_completion", "text"] = Field(
        "messages",
        description="alpaca (instruction, optional input, output), messages (OpenAI-style "
        "lists of {role, content}; ShareGPT's {from, value} through role_key/content_key/"
        "roles), prompt_completion (raw prompt and completion, no template) or text (plain "
        "text, every token trained).",
    )
    columns: ChatColumns = Field(default_factory=ChatColumns)
    role_key: str = Field("role", description="messages: the key of a turn's role ('from').")
    content_key: str = Field(
        "content", description="messages: the key of a turn's text ('value' for ShareGPT)."
    )
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=dict,
        description="Extra role names mapped to system/user/assistant, e.g. ShareGPT's "
        "{human: user, gpt: assistant}; the three names themselves always map to themselves.",
    )
    system_prompt: str | None = Field(
        None, description="A system message given to every conversation that has none."
    )
    template: str = Field(
        "tokenizer",
        description="The chat template: 'tokenizer' (the model's own), a named one (chatml, "
        "alpaca), or a Jinja string. It travels in the model artifact and every prompt is "
        "rendered from that copy.",
    )
    train_on_prompt: bool = Field(
        False,
        description="Also train on prompt, system and template tokens (default: only the "
        "assistant's tokens, every assistant turn).",
    )
    too_long: Literal["drop", "truncate_prompt"] = Field(
        "drop",
        description="An example over data.max_length tokens is dropped (counted), or its "
        "prompt is cut from the left so that the last response stays whole.",
    )

    @field_validator("roles")
    @classmethod
    def _no_reserved_keys(cls, value: dict[str, str]) -> dict[str, str]:
        clash = [k for k in value if k.strip().lower() in CHAT_ROLES and value[k] != k.lower()]
        if clash:
            raise ValueError(f"roles may not remap the standard role names {clash}")
        return {k.strip().lower(): v for k, v in value.items()}

    def role_names(self) -> dict[str, str]:
        """Every accepted role name (lower case) -> system, user or assistant."""
        return {**{r: r for r in CHAT_ROLES}, **self.roles}


class GenerationEvalSection(Section):
    """Generation on a fixed sample of validation prompts at every evaluation."""

    samples: int = Field(
        8, ge=0, le=1024, description="Validation prompts generated from (0: no generation)."
    )
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Greedy tokens per answer.")
    scorer: Literal["none", "gsm8k"] = Field(
        "none",
        description="A task scorer on top of exact match and ROUGE-L: gsm8k compares the "
        "final number of the answer with the reference's.",
    )
    batch_size: int = Field(8, ge=1, description="Prompts generated together.")
