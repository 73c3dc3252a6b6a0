"""Chat examples of ``task: causal_lm``: formats to turns, chat templates, the loss mask of
each token, the too-long policy, cleaning, and the prompt a served model renders (the same
token ids as training), all with SmolLM2's real tokenizer (ChatML, pad = eos = <|im_end|>)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from lepton_ray.artifacts import ModelMeta
from lepton_ray.config import validate_experiment
from lepton_ray.config.chat import ChatConfig
from lepton_ray.errors import DataError, StageError
from lepton_ray.tasks.causal_lm import CausalLM
from lepton_ray.tasks.chat import (
    ALPACA,
    CHATML,
    CONTEXT,
    IGNORE,
    LAST_RESPONSE,
    RESPONSE,
    ChatEncoder,
    TemplateError,
    canonical,
    install_template,
    parse,
    render,
    row_turns,
)

WHERE = "data test: row 1"
CONVERSATION = [
    {"role": "system", "content": "You are a terse maths tutor."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3? Show the sum."},
    {"role": "assistant", "content": "3 + 3 = 6, so it is 6."},
]
CLEAN = {
    "unicode_form": "NFKC",
    "lowercase": False,
    "strip_html": False,
    "mask_pii": [],
    "min_chars": 1,
    "max_chars": None,
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    """SmolLM2's tokenizer with its own template installed (as the data stage has it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    install_template(tok, "tokenizer", needs_template=True)
    return tok


def _fresh(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _options(**over):
    return {
        "template": "tokenizer",
        "format": "messages",
        "train_on_prompt": False,
        "too_long": "drop",
        **over,
    }


def _runs(parts, value):
    """[start, end) index runs of ``parts == value``."""
    runs, start = [], None
    for j, p in enumerate([*parts, None]):
        if p == value and start is None:
            start = j
        elif p != value and start is not None:
            runs.append((start, j))
            start = None
    return runs


# ------------------------------------------------------------------------------ loss mask
def test_loss_mask_trains_every_assistant_turn_and_nothing_else(tokenizer):
    ids, labels, parts = ChatEncoder(tokenizer, 512, False, "drop").encode(CONVERSATION)
    assert len(ids) == len(labels) == len(parts)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]

    # Position by position: trained <=> an assistant part, and then label == id.
    for j, (tok, label, part) in enumerate(zip(ids, labels, parts)):
        if part == CONTEXT:
            assert label == IGNORE, (j, tokenizer.convert_ids_to_tokens(tok))
        else:
            assert label == tok, j

    # One span per assistant turn; the earlier is RESPONSE, the last LAST_RESPONSE.
    spans = sorted(_runs(parts, RESPONSE) + _runs(parts, LAST_RESPONSE))
    assert len(spans) == 2
    assert parts[spans[0][0]] == RESPONSE and parts[spans[1][0]] == LAST_RESPONSE
    assert _runs(parts, RESPONSE) == [spans[0]] and _runs(parts, LAST_RESPONSE) == [spans[1]]

    answers = [t["content"] for t in CONVERSATION if t["role"] == "assistant"]
    for (start, end), answer in zip(spans, answers):
        span = ids[start:end]
        # The span is the content, then <|im_end|> and its line break; nothing else.
        content = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert span == content + [im_end] + newline
        assert tokenizer.decode(span) == answer + "<|im_end|>\n"
        # Right before it: the template's header <|im_start|>assistant\n, untrained.
        assert ids[start - len(header) : start] == header
        assert all(lab == IGNORE for lab in labels[start - len(header) : start])

    # The system message, the user turns and all headers: untrained.
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert tokenizer.decode(trained) == "".join(a + "<|im_end|>\n" for a in answers)
    context = tokenizer.decode([t for t, p in zip(ids, parts) if p == CONTEXT])
    for turn in CONVERSATION:
        if turn["role"] != "assistant":
            assert turn["content"] in context
    assert context.count("<|im_start|>") == 5  # system, 2 users, 2 assistant headers


def test_train_on_prompt_trains_every_token(tokenizer):
    ids, labels, parts = ChatEncoder(tokenizer, 512, True, "drop").encode(CONVERSATION)
    assert labels == ids
    assert CONTEXT in parts and LAST_RESPONSE in parts  # parts still tell the turns apart


def test_training_and_serving_render_the_same_prompt_ids(smollm2_path, tokenizer, tmp_path):
    """Data stage (encoder on the row's canonical JSON) and serving (the artifact's saved
    tokenizer, reloaded) give the same ids for the prompt."""
    from transformers import AutoTokenizer

    from lepton_ray.tasks.chat import template_digest

    encode = CausalLM().encoder(str(smollm2_path), 512, _options())
    out = encode([canonical(CONVERSATION)])
    assert out["drop"] == [""]
    ids, parts = out["input_ids"][0], out["parts"][0]
    first = parts.index(LAST_RESPONSE)

    saved = _fresh(smollm2_path)
    install_template(saved, "tokenizer", needs_template=True)
    saved.save_pretrained(tmp_path / "artifact")
    served = AutoTokenizer.from_pretrained(tmp_path / "artifact")
    assert template_digest(served.chat_template) == template_digest(tokenizer.chat_template)
    prompt = ChatEncoder(served, 512, False, "drop").prompt_ids(CONVERSATION[:-1])
    assert prompt == ids[:first]
    assert served.decode(prompt).endswith("<|im_start|>assistant\n")


def test_a_named_template_travels_in_the_saved_tokenizer(smollm2_path, tmp_path):
    from transformers import AutoTokenizer

    tok = _fresh(smollm2_path)
    assert install_template(tok, "chatml", needs_template=True) == CHATML
    tok.save_pretrained(tmp_path / "artifact")
    served = AutoTokenizer.from_pretrained(tmp_path / "artifact")
    assert served.chat_template == CHATML
    # ChatML without SmolLM's default system message.
    text = render(served, CONVERSATION[1:3])
    assert (
        text
        == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    )


# ------------------------------------------------------------------------------ formats
def test_alpaca_with_and_without_input():
    chat = ChatConfig(format="alpaca")
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert row_turns(row, chat, WHERE) == [
        {"role": "user", "content": "Translate to French.\n\nGood morning"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    for blank in ("", "   ", None, float("nan")):
        turns = row_turns({**row, "input": blank}, chat, WHERE)
        assert turns[0] == {"role": "user", "content": "Translate to French."}
    no_input = {"instruction": "Say hi.", "output": "Hi."}
    assert row_turns(no_input, chat, WHERE)[0]["content"] == "Say hi."
    # A missing required field: None (counted as missing_text), not an error.
    assert row_turns({"instruction": "Say hi.", "output": ""}, chat, WHERE) is None
    assert row_turns({"output": "Hi."}, chat, WHERE) is None


def test_system_column_and_system_prompt():
    row = {"instruction": "Say hi.", "output": "Hi.", "sys": "Be polite."}
    chat = ChatConfig(format="alpaca", columns={"system": "sys"}, system_prompt="Default.")
    turns = row_turns(row, chat, WHERE)
    assert turns[0] == {"role": "system", "content": "Be polite."}  # the column wins
    turns = row_turns({**row, "sys": ""}, chat, WHERE)
    assert turns[0] == {"role": "system", "content": "Default."}  # blank: the default
    assert [t["role"] for t in turns] == ["system", "user", "assistant"]

    messages = ChatConfig(format="messages", system_prompt="Default.")
    own = [
        {"role": "system", "content": "Own system."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert row_turns({"messages": own}, messages, WHERE) == own  # never a second system turn
    turns = row_turns({"messages": own[1:]}, messages, WHERE)
    assert turns == [{"role": "system", "content": "Default."}, *own[1:]]
    assert row_turns({"messages": own[1:]}, ChatConfig(), WHERE) == own[1:]


def test_sharegpt_from_value_with_role_names():
    chat = ChatConfig(
        format="messages",
        role_key="from",
        content_key="value",
        roles={"human": "user", "GPT": "assistant"},
    )
    value = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Hello?"},
        {"from": "gpt", "value": "Hi!"},
        {"from": "Human", "value": "Bye?"},
        {"from": "gpt", "value": "Bye!"},
    ]
    turns = row_turns({"messages": value}, chat, WHERE)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user", "assistant"]
    assert [t["content"] for t in turns] == ["S", "Hello?", "Hi!", "Bye?", "Bye!"]


def test_messages_as_json_string_or_list_or_array():
    chat = ChatConfig(format="messages")
    value = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    as_list = row_turns({"messages": value}, chat, WHERE)
    assert as_list == value
    assert row_turns({"messages": json.dumps(value)}, chat, WHERE) == value  # CSV
    assert row_turns({"messages": np.array(value, dtype=object)}, chat, WHERE) == value
    with pytest.raises(DataError, match="not a JSON list"):
        row_turns({"messages": "[{'role': 'user'"}, chat, WHERE)
    with pytest.raises(DataError, match="non-empty list"):
        row_turns({"messages": []}, chat, WHERE)


def test_prompt_completion_masks_the_prompt_and_trains_completion_and_eos(tokenizer):
    chat = ChatConfig(format="prompt_completion")
    turns = row_turns({"prompt": "The capital of France is", "completion": " Paris."}, chat, WHERE)
    assert turns == [
        {"role": "prompt", "content": "The capital of France is"},
        {"role": "completion", "content": " Paris."},
    ]
    assert row_turns({"prompt": "x", "completion": None}, chat, WHERE) is None
    ids, labels, parts = ChatEncoder(tokenizer, 64, False, "drop").encode(turns)
    prompt = tokenizer("The capital of France is")["input_ids"]
    answer = tokenizer(" Paris.", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer + [tokenizer.eos_token_id]
    assert labels == [IGNORE] * len(prompt) + answer + [tokenizer.eos_token_id]
    assert parts == [CONTEXT] * len(prompt) + [LAST_RESPONSE] * (len(answer) + 1)
    assert "<|im_start|>" not in tokenizer.decode(ids)  # no template around raw formats


def test_text_trains_every_token_and_appends_eos(tokenizer):
    chat = ChatConfig(format="text")
    turns = row_turns({"text": "Once upon a time."}, chat, WHERE)
    assert turns == [{"role": "text", "content": "Once upon a time."}]
    assert row_turns({"text": "  "}, chat, WHERE) is None
    ids, labels, parts = ChatEncoder(tokenizer, 64, False, "drop").encode(turns)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == "Once upon a time."
    assert labels == ids
    assert set(parts) == {RESPONSE}


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "value, message",
    [
        ([{"role": "user", "content": "Q"}, {"role": "user", "content": "Q2"}], "no assistant"),
        (
            [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}],
            r"unknown role 'bot'; known roles are \['assistant', 'system', 'user'\]",
        ),
        ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}], "empty"),
        ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": None}], "empty"),
        (
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "system", "content": "S2"},
                {"role": "assistant", "content": "A"},
            ],
            "system turn may only come first",
        ),
        (["not a turn", {"role": "assistant", "content": "A"}], "not an object"),
    ],
)
def test_malformed_conversations_raise_data_error(value, message):
    with pytest.raises(DataError, match=message) as err:
        row_turns({"messages": value}, ChatConfig(format="messages"), WHERE)
    assert WHERE in str(err.value)


def test_a_system_turn_that_is_not_first_is_refused():
    """A system turn anywhere but first, even when the conversation has no first one."""
    value = [
        {"role": "user", "content": "Q"},
        {"role": "system", "content": "S"},
        {"role": "assistant", "content": "A"},
    ]
    with pytest.raises(DataError, match="system turn may only come first"):
        row_turns({"messages": value}, ChatConfig(format="messages"), WHERE)


@pytest.mark.parametrize(
    "template, message",
    [("{{ raise_exception('boom') }}", "boom"), ("{{ messages | nosuchfilter }}", "nosuchfilter")],
)
def test_a_failing_template_raises_template_error(smollm2_path, template, message):
    tok = _fresh(smollm2_path)
    with pytest.raises(TemplateError, match=message):
        install_template(tok, template, needs_template=True)
    tok.chat_template = template
    with pytest.raises(TemplateError, match="the chat template failed"):
        render(tok, CONVERSATION)


def test_a_template_that_drops_the_answer_is_refused(smollm2_path):
    ignores_assistant = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(TemplateError, match="loss mask cannot be found"):
        install_template(_fresh(smollm2_path), ignores_assistant, needs_template=True)


def test_no_chat_template_with_messages_says_to_set_data_chat_template(smollm2_path):
    tok = _fresh(smollm2_path)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="set data.chat.template"):
        install_template(tok, "tokenizer", needs_template=True)
    # Raw formats need no template.
    assert install_template(tok, "tokenizer", needs_template=False) is None
    with pytest.raises(TemplateError, match="neither 'tokenizer', a named template"):
        install_template(tok, "vicuna", needs_template=True)


def test_the_encoder_refuses_a_model_without_template(smollm2_path, tmp_path):
    """encoder() of a tokenizer without template and format messages: the configured template
    is refused before any row is read, as the data stage's one-line error."""
    tok = _fresh(smollm2_path)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "bare")
    (tmp_path / "bare" / "chat_template.jinja").unlink(missing_ok=True)
    shutil.copy(smollm2_path / "config.json", tmp_path / "bare" / "config.json")
    with pytest.raises(DataError, match="data.chat.template: the model's tokenizer has no chat"):
        CausalLM().encoder(str(tmp_path / "bare"), 64, _options())


def test_named_templates_install_and_render(smollm2_path):
    tok = _fresh(smollm2_path)
    install_template(tok, "chatml", needs_template=True)
    ids, labels, parts = ChatEncoder(tok, 256, False, "drop").encode(CONVERSATION[1:3])
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE]) == (
        "It is 4.<|im_end|>\n"
    )

    tok = _fresh(smollm2_path)
    assert install_template(tok, "alpaca", needs_template=True) == ALPACA
    text = render(tok, CONVERSATION[1:3])
    assert text == "### Instruction:\nWhat is 2+2?\n\n### Response:\nIt is 4.<|im_end|>\n\n"
    ids, labels, parts = ChatEncoder(tok, 256, False, "drop").encode(CONVERSATION[1:3])
    (start, end), *rest = _runs(parts, LAST_RESPONSE)
    assert not rest
    span = ids[start:end]
    eos = tok.eos_token_id
    assert eos in span  # the model learns to end its answer
    at = span.index(eos)
    assert tok.decode(span[:at]) == "It is 4."
    assert tok.decode(span[at + 1 :]).strip() == ""  # only the template's blank line after it
    assert tok.decode(ids[:start]).endswith("### Response:\n")


# ------------------------------------------------------------------------------ too long
def _single():
    return [
        {"role": "user", "content": "Please repeat these words: " + "alpha beta gamma " * 12},
        {"role": "assistant", "content": "alpha beta gamma"},
    ]


def test_too_long_drop(tokenizer):
    ids, labels, parts = ChatEncoder(tokenizer, 512, False, "drop").encode(_single())
    enc = ChatEncoder(tokenizer, len(ids) - 1, False, "drop")
    assert enc.fit(ids, labels, parts) == (None, "too_long_tokens")
    fits = ChatEncoder(tokenizer, len(ids), False, "drop").fit(ids, labels, parts)
    assert fits == ((ids, labels, parts), None)


def test_truncate_prompt_cuts_the_prompt_from_the_left(tokenizer):
    ids, labels, parts = ChatEncoder(tokenizer, 512, False, "drop").encode(_single())
    response = [t for t, p in zip(ids, parts) if p == LAST_RESPONSE]
    limit = len(response) + 10
    assert len(ids) > limit
    (out_ids, out_labels, out_parts), reason = ChatEncoder(
        tokenizer, limit, False, "truncate_prompt"
    ).fit(ids, labels, parts)
    assert reason is None
    assert len(out_ids) == len(out_labels) == len(out_parts) == limit
    assert out_ids == ids[-limit:] and out_labels == labels[-limit:]  # cut from the left
    assert [t for t, p in zip(out_ids, out_parts) if p == LAST_RESPONSE] == response
    assert tokenizer.decode(out_ids).endswith("<|im_start|>assistant\nalpha beta gamma<|im_end|>\n")


def test_a_response_longer_than_max_length_is_dropped(tokenizer):
    turns = [
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": " ".join(str(i) for i in range(40))},
    ]
    ids, labels, parts = ChatEncoder(tokenizer, 512, False, "drop").encode(turns)
    response = sum(p == LAST_RESPONSE for p in parts)
    enc = ChatEncoder(tokenizer, response - 1, False, "truncate_prompt")
    assert enc.fit(ids, labels, parts) == (None, "response_too_long")


def test_truncate_prompt_keeps_a_multi_turn_example_whose_last_response_fits(tokenizer):
    """ChatConfig.too_long: 'its prompt is cut from the left so that the last response
    stays whole' -- the prompt of a multi-turn example includes its earlier answers."""
    turns = [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once upon a time " * 20},
        {"role": "user", "content": "Now say yes."},
        {"role": "assistant", "content": "Yes."},
    ]
    ids, labels, parts = ChatEncoder(tokenizer, 512, False, "drop").encode(turns)
    last = parts.index(LAST_RESPONSE)
    limit = len(ids) - last + 12  # the last response and its user turn fit, not the story
    assert len(ids) - limit > parts.index(RESPONSE)  # the cut reaches into the story
    fitted, reason = ChatEncoder(tokenizer, limit, False, "truncate_prompt").fit(ids, labels, parts)
    assert reason is None, reason
    out_ids, _, out_parts = fitted
    assert len(out_ids) == limit
    assert out_ids[out_parts.index(LAST_RESPONSE) :] == ids[last:]


# ------------------------------------------------------------------------------ cleaning
def test_clean_keeps_layout_and_turns_masks_email_and_adds_the_prompt():
    code = "Here:\n```python\ndef f(x):\n    return x + 1   \n```"
    rows = [
        [
            {"role": "system", "content": "You write code."},
            {"role": "user", "content": "Write f.\r\nThanks"},
            {"role": "assistant", "content": code},
        ],
        [
            {"role": "user", "content": "Mail me at jane.doe@example.com please"},
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": " \u200b \r\n\t "},
        ],
    ]
    batch = pd.DataFrame({"text": [canonical(t) for t in rows] + [None], "label": [""] * 4})
    out = CausalLM().clean(batch, {**CLEAN, "mask_pii": ["email"]})
    assert list(out["drop_reason"]) == ["", "", "empty_text", "missing_text"]
    assert (out["label"] == "").all()

    first = parse(out["text"][0])
    assert [t["role"] for t in first] == ["system", "user", "assistant"]
    # Newlines and indentation inside a turn stay; only trailing spaces and CRs go.
    assert first[2]["content"] == "Here:\n```python\ndef f(x):\n    return x + 1\n```"
    assert first[1]["content"] == "Write f.\nThanks"
    assert out["prompt"][0] == canonical(first[:2])

    second = parse(out["text"][1])
    assert [t["role"] for t in second] == ["user", "assistant", "user", "assistant"]
    assert second[0]["content"] == "Mail me at [EMAIL] please"
    assert list(out["masked_email"]) == [0, 1, 0, 0]
    # The prompt: every turn before the last assistant turn (earlier answers included).
    assert out["prompt"][1] == canonical(second[:3])
    assert "[EMAIL]" in out["prompt"][1]

    third = parse(out["text"][2])
    assert len(third) == 2 and third[1]["content"] == ""


def test_clean_of_plain_text_keys_the_row_by_itself():
    text = canonical([{"role": "text", "content": "A poem\n  with indent"}])
    out = CausalLM().clean(pd.DataFrame({"text": [text], "label": [""]}), CLEAN)
    assert out["drop_reason"][0] == ""
    assert parse(out["text"][0])[0]["content"] == "A poem\n  with indent"
    assert out["prompt"][0] == out["text"][0]


def test_clean_drops_a_row_over_max_chars():
    text = canonical(
        [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 30}]
    )
    out = CausalLM().clean(
        pd.DataFrame({"text": [text], "label": [""]}), {**CLEAN, "max_chars": 50}
    )
    assert out["drop_reason"][0] == "too_long"


# ------------------------------------------------------------------------------ artifact check
def _cfg(template="tokenizer"):
    return validate_experiment(
        {
            "name": "chat",
            "task": "causal_lm",
            "data": {
                "path": "/nonexistent/chat.jsonl",
                "max_length": 64,
                "chat": {"template": template},
            },
            "model": {"name": "smollm2", "random_init": True},
            "tune": {"metric": "val_loss", "mode": "min"},
        },
        check_files=False,
    )


def test_check_tokenizer_fails_closed_on_a_changed_template(smollm2_path):
    task = CausalLM()
    cfg = _cfg()
    tok = task.prepare_tokenizer(_fresh(smollm2_path), cfg)
    meta = ModelMeta(
        task="causal_lm", labels=[], base_model="x", max_length=64, extra=task.meta_extra(tok, cfg)
    )
    chat = meta.extra["chat"]
    assert chat["has_template"] and chat["format"] == "messages"
    assert tok.convert_tokens_to_ids("<|im_end|>") in chat["stop_token_ids"]
    task.check_tokenizer(tok, meta)  # the template it was trained with: accepted

    tok.chat_template = CHATML  # changed after training
    with pytest.raises(StageError, match="differs from the one it was trained with"):
        task.check_tokenizer(tok, meta)
    tok.chat_template = None  # lost
    with pytest.raises(StageError, match="differs"):
        task.check_tokenizer(tok, meta)
    with pytest.raises(StageError, match="no chat settings"):
        task.check_tokenizer(
            tok, ModelMeta(task="causal_lm", labels=[], base_model="x", max_length=64)
        )
