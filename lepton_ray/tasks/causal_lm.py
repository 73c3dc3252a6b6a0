"""Causal language modelling: instructions and chats in, generated text out.

Examples are read in one of four formats (``data.chat.format``, see ``tasks/chat.py``),
rendered through the chat template that travels in the model artifact, and trained on the
assistant's tokens only (unless ``data.chat.train_on_prompt``). Each token row carries per
token targets (labels, parts; positions when packed), so its loss is next-token
cross-entropy over trained positions, averaged over every trained token of a step.
Evaluation: loss, perplexity and token accuracy on response tokens, and greedy generation
on a fixed sample of validation prompts scored by exact match, ROUGE-L and an optional task
scorer. Answers are generated text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

from lepton_ray.errors import DataError
from lepton_ray.tasks.base import Task
from lepton_ray.tasks.chat import (
    KEPT,
    TEMPLATED_FORMATS,
    ChatEncoder,
    TemplateError,
    canonical,
    fit_example,
    install_template,
    parse,
    prompt_of,
    row_turns,
    stop_token_ids,
    template_digest,
)

if TYPE_CHECKING:
    from lepton_ray.config import DataConfig, ExperimentConfig, ModelConfig

PROMPT = "prompt"
"""Column of the rows (and the files) with each example's prompt turns as canonical JSON:
splits and contamination are keyed by it, so one prompt never trains and evaluates."""
PACKING_VERIFIED = (
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo",
    "olmo2", "granite", "smollm3",
)  # fmt: skip
"""Model types whose attention takes the block-diagonal mask or varlen positions."""


def chat_tokenizer(model_name: str, template: str, chat_format: str):
    """The model's tokenizer with the configured template installed (what the artifact
    saves and every prompt is rendered from)."""
    from transformers import AutoTokenizer

    from lepton_ray.config.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_name))
    install_template(tokenizer, template, chat_format in TEMPLATED_FORMATS)
    return tokenizer


class CausalLM(Task):
    name: ClassVar[str] = "causal_lm"
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    peft_task_type: ClassVar[str] = "CAUSAL_LM"
    # Prompt tuning prepends its virtual tokens to the logits (the token loss and accuracy
    # read them aligned with the input ids), and the serving engine drives its own KV cache;
    # prefix tuning keeps the logits aligned (its tokens live in the cache only).
    peft_virtual_token_methods: ClassVar[tuple[str, ...]] = ("prefix",)
    target_column: ClassVar[str] = "labels"
    target_columns: ClassVar[tuple[str, ...]] = ("labels", "parts")
    metrics: ClassVar[tuple[str, ...]] = (
        "val_loss",
        "val_perplexity",
        "val_token_accuracy",
        "val_exact_match",
        "val_rouge_l",
        "val_gsm8k",
        "train_loss",
    )
    keep_float: ClassVar[tuple[str, ...]] = ("lm_head",)
    gate_score: ClassVar[str] = "perplexity"
    serving: ClassVar[str] = "generate"

    # ------------------------------------------------------------------ config
    def validate(self, cfg: ExperimentConfig) -> list[str]:
        problems = []
        data = cfg.data
        if data.augment.enabled:
            problems.append("data.augment: word-level augmentation is for classifiers; drop it")
        gen = cfg.train.generation
        if cfg.tune.metric in ("val_exact_match", "val_rouge_l", "val_gsm8k") and not gen.samples:
            problems.append(
                f"tune.metric {cfg.tune.metric} is a generation score; set "
                "train.generation.samples above 0"
            )
        if cfg.tune.metric == "val_gsm8k" and gen.scorer != "gsm8k":
            problems.append("tune.metric val_gsm8k needs train.generation.scorer: gsm8k")
        if data.packing:
            model_type = _model_type(cfg.model)
            if model_type is not None and model_type not in PACKING_VERIFIED:
                problems.append(
                    f"data.packing: model type '{model_type}' is not known to honour example "
                    "boundaries in packed rows (attention would cross examples); set "
                    f"data.packing: false (verified: {', '.join(PACKING_VERIFIED)})"
                )
        if data.chat.format in TEMPLATED_FORMATS or data.chat.template != "tokenizer":
            try:
                chat_tokenizer(cfg.model.name, data.chat.template, data.chat.format)
            except TemplateError as err:
                problems.append(f"data.chat.template: {err}")
            except OSError:
                pass  # a hub model not cached here: the data stage loads it and says so
        return problems

    # ------------------------------------------------------------------ data
    def source_columns(
        self, data: DataConfig, with_label: bool = True
    ) -> list[tuple[str, list[str]]]:
        cols, fmt = data.chat.columns, data.chat.format
        needed = {
            "alpaca": [cols.instruction, cols.output] if with_label else [cols.instruction],
            "messages": [cols.messages],
            "prompt_completion": [cols.prompt, cols.completion] if with_label else [cols.prompt],
            "text": [cols.text],
        }[fmt]
        out = [(f"data.chat.columns ({fmt})", needed)]
        if cols.system:
            out.append(("data.chat.columns.system", [cols.system]))
        return out

    def format_rows(self, batch, data: DataConfig, with_label: bool = True):
        """``text``: each row's turns as canonical JSON (null when a field is missing);
        ``label``: '' (a language model has no class)."""
        import pyarrow as pa

        chat = data.chat
        wanted = [c for _, names in self.source_columns(data) for c in names]
        if chat.format == "alpaca":
            wanted.append(chat.columns.input)
        present = [c for c in dict.fromkeys(wanted) if c in batch.schema.names]
        columns = {c: batch.column(c).to_pylist() for c in present}
        texts: list[str | None] = []
        for i in range(batch.num_rows):
            row = {c: values[i] for c, values in columns.items()}
            where = f"row {_preview(row)}"
            turns = row_turns(row, chat, where)
            texts.append(None if turns is None else canonical(turns))
        return pa.table(
            {
                "text": pa.array(texts, pa.string()),
                "label": pa.array([""] * batch.num_rows, pa.string()),
            }
        )

    def prediction_rows(self, batch, data: DataConfig, with_label: bool = False):
        """Prompts to generate for: ``text`` is a row's turns up to its last user turn (JSON;
        the raw prompt of a prompt_completion or text model), ``label`` the answer the row
        carries (its output, completion or last assistant turn), else null."""
        import pyarrow as pa

        chat = data.chat
        wanted = [c for _, names in self.source_columns(data) for c in names]
        wanted += [chat.columns.input] if chat.format == "alpaca" else []
        present = [c for c in dict.fromkeys(wanted) if c in batch.schema.names]
        columns = {c: batch.column(c).to_pylist() for c in present}
        texts: list[str | None] = []
        answers: list[str | None] = []
        for i in range(batch.num_rows):
            row = {c: values[i] for c, values in columns.items()}
            turns = row_turns(row, chat, f"row {_preview(row)}", answer=False)
            reference = None
            if turns and turns[-1]["role"] in ("assistant", "completion"):
                reference = turns.pop()["content"]
            if turns and turns[-1]["role"] == "system":
                raise DataError(f"row {_preview(row)}: no user turn to answer")
            answers.append(reference)
            if not turns:
                texts.append(None)
            elif chat.format in TEMPLATED_FORMATS:
                texts.append(canonical(turns))
            else:
                texts.append(turns[0]["content"])
        out = {"text": pa.array(texts, pa.string())}
        if with_label:
            out["label"] = pa.array(answers, pa.string())
        return pa.table(out)

    def clean(self, batch, clean: dict[str, Any]):
        """Each turn's content is cleaned (layout kept); the roles and turns stay. A turn
        cleaned down to nothing drops the row as ``empty_text``; a row over
        ``max_chars`` in all as ``too_long``. Adds :data:`PROMPT`."""
        import numpy as np
        import pandas as pd

        from lepton_ray.text import PII_KINDS, normalize_layout_counted, pii_kinds

        kinds = pii_kinds(clean["mask_pii"])
        n = len(batch)
        texts, prompts, reasons = [], [], []
        masked = {kind: np.zeros(n, dtype=np.int64) for kind in PII_KINDS}
        for i, raw in enumerate(batch["text"].tolist()):
            if not isinstance(raw, str):  # None, NaN or NA: a missing field
                texts.append("")
                prompts.append("")
                reasons.append("missing_text")
                continue
            turns = parse(raw)
            reason = KEPT
            for turn in turns:
                text, counts = normalize_layout_counted(
                    turn["content"],
                    clean["unicode_form"],
                    clean["lowercase"],
                    clean["strip_html"],
                    kinds,
                )
                for kind, count in counts.items():
                    masked[kind][i] += count
                turn["content"] = text
                if len(text) < clean["min_chars"]:
                    reason = "empty_text"
            total = sum(len(t["content"]) for t in turns)
            if reason == KEPT and clean["max_chars"] is not None and total > clean["max_chars"]:
                reason = "too_long"
            texts.append(canonical(turns))
            prompts.append(canonical(prompt_of(turns)) if turns[0]["role"] != "text" else "")
            reasons.append(reason)
        out = pd.DataFrame(
            {"text": texts, "label": [""] * n, "drop_reason": reasons, PROMPT: prompts}
        )
        # A plain text has no prompt: it is keyed by itself.
        out[PROMPT] = [p or t for p, t in zip(out[PROMPT], out["text"])]
        for kind in PII_KINDS:
            out[f"masked_{kind}"] = masked[kind]
        return out

    def vocabulary(self, found: Iterable[str], where: str) -> list[str]:
        return []

    def encode_targets(self, labels: Sequence[str], vocabulary: Sequence[str]):
        raise NotImplementedError("a language model's targets come with its tokens")

    def shortener(self, max_length: int, special_ids: set[int], cfg: ExperimentConfig):
        """A longer example gets ``data.chat.too_long`` at ``max_length``, as the encoder
        applies it: dropped, or its context's first tokens cut (``fit_example``)."""
        import numpy as np

        def cut(ids, targets):
            fitted, _ = fit_example(
                ids, targets[:, 0], targets[:, 1], max_length, cfg.data.chat.too_long
            )
            if fitted is None:
                return None
            kept, labels, parts = fitted
            return kept, np.stack([labels, parts], axis=1)

        return cut

    def encoder(self, model_name: str, max_length: int, options: dict[str, Any]):
        """texts (canonical JSON) -> ``input_ids``, ``labels``, ``parts``, the reason an
        example is dropped ('' when kept) under the ``too_long`` policy, and ``prompt_cut``:
        the prompt tokens ``truncate_prompt`` cut from a kept example (0 when whole)."""
        try:
            tokenizer = chat_tokenizer(model_name, options["template"], options["format"])
        except TemplateError as err:
            raise DataError(f"data.chat.template: {err}") from None
        enc = ChatEncoder(tokenizer, max_length, options["train_on_prompt"], options["too_long"])

        def encode(texts: Sequence[str]) -> dict[str, list]:
            out: dict[str, list] = {
                "input_ids": [], "labels": [], "parts": [], "drop": [], "prompt_cut": []
            }  # fmt: skip
            for text in texts:
                try:
                    whole = enc.encode(parse(text))
                    fitted, reason = enc.fit(*whole)
                except TemplateError as err:
                    raise DataError(f"data.chat.template: {err}") from None
                ids, labels, parts = fitted if fitted else ([], [], [])
                if fitted and all(x == -100 for x in labels[1:]):
                    reason, ids, labels, parts = "no_trained_tokens", [], [], []
                for key, value in (("input_ids", ids), ("labels", labels), ("parts", parts)):
                    out[key].append(value)
                out["drop"].append(reason or "")
                out["prompt_cut"].append(len(whole[0]) - len(ids) if ids else 0)
            return out

        return encode

    # ------------------------------------------------------------------ model
    def model_config(self, path: str, labels: list[str], overrides: dict[str, Any]):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, **overrides)

    def build_model(self, path: str, cfg: ModelConfig, labels: list[str], seed: int = 0):
        import torch

        from lepton_ray.config.regularization import set_dropout

        hf_config = self.model_config(path, labels, cfg.config_overrides)
        set_dropout(hf_config, cfg.dropout)
        if cfg.random_init:
            torch.manual_seed(seed)
            return self.load_class().from_config(hf_config)
        return self.load_class().from_pretrained(path, config=hf_config, dtype=torch.float32)

    def prepare_tokenizer(self, tokenizer, cfg: ExperimentConfig):
        install_template(
            tokenizer, cfg.data.chat.template, cfg.data.chat.format in TEMPLATED_FORMATS
        )
        return tokenizer

    def meta_extra(self, tokenizer, cfg: ExperimentConfig) -> dict[str, Any]:
        """What the artifact records of the chat: how prompts are rendered and answers end."""
        return {
            "chat": {
                "format": cfg.data.chat.format,
                "template_sha": template_digest(getattr(tokenizer, "chat_template", None)),
                "has_template": bool(getattr(tokenizer, "chat_template", None)),
                "stop_token_ids": stop_token_ids(tokenizer),
                "max_new_tokens": cfg.train.generation.max_new_tokens,
                "train_on_prompt": cfg.data.chat.train_on_prompt,
                "too_long": cfg.data.chat.too_long,
            }
        }

    # ------------------------------------------------------------------ batches and loss
    def collate(self, input_ids, targets, pad_id: int) -> dict:
        from lepton_ray.tasks.causal_lm_eval import collate

        return collate(input_ids, targets, pad_id)

    def model_inputs(self, batch: dict, model) -> dict:
        from lepton_ray.tasks.causal_lm_eval import model_inputs

        return model_inputs(batch, model)

    def loss(self, outputs, batch, label_smoothing: float = 0.0):
        from lepton_ray.tasks.causal_lm_eval import token_loss

        return token_loss(outputs.logits, batch["labels"], label_smoothing=label_smoothing)

    def distill_loss(self, student_outputs, teacher_outputs, batch, temperature: float):
        """Token-level KL over the vocabulary at the trained positions, as ``loss``."""
        from lepton_ray.tasks.distill import token_kl

        return token_kl(
            student_outputs.logits, teacher_outputs.logits, batch["labels"], temperature
        )

    def weight(self, targets) -> int:
        from lepton_ray.tasks.causal_lm_eval import trained_tokens

        return trained_tokens(targets)

    def evaluation_data(self, rows, batch_size: int, pad_id: int, tokenizer, cfg):
        """Validation batches (longest first) and the generation sample."""
        from lepton_ray.tasks.causal_lm_eval import EvalData

        batches = list(super().evaluation_data(rows, batch_size, pad_id, tokenizer, cfg))
        examples = (
            (rows.sequences([i])[0], rows.targets[rows.offsets[i] : rows.offsets[i + 1], 1])
            for i in range(len(rows))
        )
        return EvalData(
            batches,
            _sample(examples, tokenizer, pad_id, cfg),
            {"scorer": cfg.train.generation.scorer},
        )

    def scoring_data(self, frames, texts_of, tokenizer, meta, cfg):
        """A version's evaluation on raw conversations: each cleaned by the artifact's
        cleaning and rendered by its own template (``check_tokenizer``), as it is served."""
        import numpy as np

        from lepton_ray.tasks.causal_lm_eval import EvalData
        from lepton_ray.text import clean_turns

        self.check_tokenizer(tokenizer, meta)
        chat = meta.extra["chat"]
        enc = ChatEncoder(
            tokenizer,
            meta.max_length,
            bool(chat.get("train_on_prompt")),
            chat.get("too_long", "drop"),
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        examples = []
        for frame in frames:
            for text in texts_of(frame):
                turns = parse(text)
                cleaned = clean_turns([t["content"] for t in turns], meta.cleaning)
                if not all(c.strip() for c in cleaned):
                    continue
                fitted, _ = enc.fit(
                    *enc.encode([{**t, "content": c} for t, c in zip(turns, cleaned)])
                )
                if fitted is not None:
                    ids, labels, parts = fitted
                    examples.append((ids, np.stack([labels, parts], axis=1)))
        size = cfg.train.eval_batch_size
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
        batches = [
            self.collate([examples[i][0] for i in cut], [examples[i][1] for i in cut], pad)
            for cut in (order[k : k + size] for k in range(0, len(order), size))
        ]
        sample = _sample(((ids, t[:, 1]) for ids, t in examples), tokenizer, pad, cfg)
        return EvalData(batches, sample, {"scorer": cfg.train.generation.scorer})

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        model,
        batches: Iterable[dict[str, Any]],
        labels: Sequence[str],
        device=None,
        rank: int = 0,
        world_size: int = 1,
        autocast: Callable[[], AbstractContextManager] | None = None,
    ) -> dict[str, Any]:
        from lepton_ray.tasks.causal_lm_eval import evaluate

        scorer = getattr(batches, "extra", {}).get("scorer", "none")
        return evaluate(model, batches, device, rank, world_size, autocast, scorer)

    def reported(self, result: dict[str, Any]) -> dict[str, float]:
        names = ["loss", "perplexity", "token_accuracy", "exact_match", "rouge_l"]
        names += ["gsm8k"] if "gsm8k" in result else []
        return {name: float(result[name]) for name in names}

    def summary(self, result: dict[str, Any]) -> str:
        line = (
            f"val_loss {result['loss']:.4f} val_perplexity {result['perplexity']:.3f} "
            f"val_token_accuracy {result['token_accuracy']:.4f}"
        )
        if result["generations"]:
            line += (
                f" val_rouge_l {result['rouge_l']:.3f} val_exact_match {result['exact_match']:.3f}"
            )
        return line

    def plot_inputs(self, result: dict[str, Any]) -> dict[str, Any]:
        return {"generations": result.get("generations", [])}

    def tables(self, inputs: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        rows = inputs.get("generations") or []
        return {"generations": rows} if rows else {}

    def agreement(self, before: dict[str, Any], after: dict[str, Any]) -> float | None:
        a, b = before.get("generations") or [], after.get("generations") or []
        if not a or len(a) != len(b):
            return None
        return sum(x["output"] == y["output"] for x, y in zip(a, b)) / len(a)

    # ------------------------------------------------------------------ prediction
    def prompt_turns(self, meta, prompt: Any) -> list[dict[str, str]]:
        """A prompt as turns (see ``causal_lm_predict.prompt_turns``)."""
        from lepton_ray.tasks.causal_lm_predict import prompt_turns

        return prompt_turns(self, meta, prompt)

    def check_tokenizer(self, tokenizer, meta) -> None:
        from lepton_ray.tasks.causal_lm_predict import check_tokenizer

        check_tokenizer(self, tokenizer, meta)

    def prompt_ids(self, tokenizer, meta, prompt: Any) -> list[int]:
        """A prompt rendered from the artifact's template (see ``causal_lm_predict``)."""
        from lepton_ray.tasks.causal_lm_predict import prompt_ids

        return prompt_ids(self, tokenizer, meta, prompt)

    def generate_answers(self, model, tokenizer, meta, prompts, max_new_tokens=None):
        """Greedy answers to ``prompts`` rendered from the artifact's own template."""
        from lepton_ray.tasks.causal_lm_predict import generate_answers

        return generate_answers(self, model, tokenizer, meta, prompts, max_new_tokens)

    def predict(self, model, tokenizer, meta, texts: Sequence[str]) -> list[dict[str, Any]]:
        return self.generate_answers(model, tokenizer, meta, texts)

    def pyfunc_signature(self, labels: Sequence[str]):
        from lepton_ray.tasks.causal_lm_predict import pyfunc_signature

        return pyfunc_signature(self, labels)

    def pyfunc_predict(self, model, tokenizer, meta, model_input, params: dict[str, Any]):
        from lepton_ray.tasks.causal_lm_predict import pyfunc_predict

        return pyfunc_predict(self, model, tokenizer, meta, model_input, params)

    def prediction_schema(self, labels: Sequence[str]) -> list[tuple[str, str]]:
        return [
            ("text", "string"),
            ("finish_reason", "string"),
            ("prompt_tokens", "long"),
            ("completion_tokens", "long"),
            ("truncated", "boolean"),
        ]

    def prediction_row(self, answer: dict[str, Any]) -> dict[str, Any]:
        return {name: answer[name] for name, _ in self.prediction_schema([])}

    def answer_cells(self, answer: dict[str, Any] | None) -> dict[str, str | float]:
        if answer is None:
            return {"answer": "", "finish": "", "tokens": 0.0}
        return {
            "answer": str(answer["text"]),
            "finish": str(answer["finish_reason"]),
            "tokens": float(answer["completion_tokens"]),
        }

    def prediction_arrays(
        self, labels: Sequence[str], n: int, rows: Sequence[int], answers: Sequence[dict]
    ) -> dict[str, Any]:
        import pyarrow as pa

        kinds = {
            "text": pa.string(),
            "finish_reason": pa.string(),
            "prompt_tokens": pa.int64(),
            "completion_tokens": pa.int64(),
            "truncated": pa.bool_(),
        }
        cells: dict[str, list] = {name: [None] * n for name in kinds}
        for i, answer in zip(rows, answers, strict=True):
            for name in kinds:
                cells[name][i] = answer[name]
        return {
            ("generated" if name == "text" else name): pa.array(cells[name], kind)
            for name, kind in kinds.items()
        }


def _sample(examples, tokenizer, pad_id: int, cfg):
    """The generation sample of ``train.generation`` from ``(ids, parts)`` examples."""
    from lepton_ray.tasks.causal_lm_eval import generation_sample

    gen = cfg.train.generation
    if not gen.samples or tokenizer is None:
        return None
    return generation_sample(
        examples,
        gen.samples,
        lambda ids: tokenizer.decode([int(t) for t in ids], skip_special_tokens=True),
        lambda ids: tokenizer.decode([int(t) for t in ids], skip_special_tokens=False),
        stop_ids=stop_token_ids(tokenizer),
        pad_id=pad_id,
        max_new_tokens=gen.max_new_tokens,
        batch_size=gen.batch_size,
        scorer=gen.scorer,
    )


def _preview(row: dict[str, Any], limit: int = 80) -> str:
    text = json.dumps(row, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _model_type(cfg: ModelConfig) -> str | None:
    from pathlib import Path

    from lepton_ray.config.model import resolve_model_path
    from lepton_ray.errors import ConfigError

    try:
        path = Path(resolve_model_path(cfg.name)) / "config.json"
        return str(json.loads(path.read_text()).get("model_type"))
    except (ConfigError, OSError, ValueError):
        return None
