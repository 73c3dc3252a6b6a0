"""The promotion gate with the real evaluator and real tiny models: versions evaluated on
other splits are scored now, each from the validation texts through its own cleaning,
tokenizer and max_length, so a genuinely worse challenger never beats a champion that was
trained with another tokenizer.

The gate metric is ``val_loss`` with ``tune.mode`` left out (inferred: min). Fed token ids it
never saw, a trained champion answers confidently and wrongly: its loss is far above the
chance-level loss of a random model, which is how the old gate let a random challenger win.
"""

from __future__ import annotations

import pytest

from lepton_ray.config import validate_experiment
from lepton_ray.data.preprocess import run_preprocess
from lepton_ray.data.sample import write_reviews_csv
from lepton_ray.data.split_files import read_split_frame
from lepton_ray.registry import gate, versions
from lepton_ray.tracking.mlflow import client, ensure_experiment, get_version_by_alias
from tests.conftest import TINY_BERT, TINY_LABELS, smoke_config

pytestmark = pytest.mark.usefixtures("ray_session")
OTHER_SPLIT = "an-older-dataset:validation"
quiet = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("gate")
    data = write_reviews_csv(tmp / "reviews.csv", n=300, seed=3)
    # tune.mode left out: val_loss is minimised.
    raw = smoke_config(tmp, data, tune={"enabled": False, "metric": "val_loss"})
    cfg = validate_experiment(raw)
    assert cfg.tune.mode == "min"
    manifest = run_preprocess(cfg, log=quiet)
    assert manifest["labels"] == TINY_LABELS
    return {"tmp": tmp, "raw": raw, "manifest": manifest, "train": read_split_frame(cfg, "train")}


def _config(experiment, name: str, **registry_section):
    raw = dict(experiment["raw"])
    raw["tracking"] = {**raw["tracking"], "registered_model_name": name}
    raw["registry"] = {"promotion": "gated", **registry_section}
    return validate_experiment(raw)


def _word_tokenizer(texts):
    """A word-level tokenizer of its own (lowercased words), unrelated to MiniLM's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    words = sorted({w for t in texts for w in t.lower().replace(".", " . ").split()})
    vocab = {token: i for i, token in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def _trained_artifact(folder, tokenizer, frame, max_length: int, cleaning: dict | None = None):
    """A tiny BERT trained on the training split's texts through ``tokenizer``, cleaning and
    ``max_length`` (the artifact records all three), saved as a full-weights artifact."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from lepton_ray.artifacts import ModelMeta, save_model_artifact
    from lepton_ray.tasks.base import encode_texts
    from lepton_ray.text import DEFAULT_CLEANING

    torch.manual_seed(0)
    meta = ModelMeta(
        task="sequence_classification",
        labels=TINY_LABELS,
        base_model="./model",
        max_length=max_length,
        weights="full",
        cleaning={**DEFAULT_CLEANING, **(cleaning or {})},
    )
    # As many embedding rows as MiniLM has ids, so that MiniLM's ids are valid input.
    config = BertConfig(vocab_size=30522, num_labels=2, **TINY_BERT)
    model = BertForSequenceClassification(config)
    # The split's files come in the order Ray wrote them, which the cluster's size changes:
    # train in a seeded order of the rows' own, the same wherever the test runs.
    frame = frame.sort_values("text", kind="stable").sample(frac=1.0, random_state=0)
    texts, targets = frame["text"].tolist(), frame["label_id"].tolist()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(60):
        start = (step * 32) % len(texts)
        encoded, _ = encode_texts(tokenizer, meta, texts[start : start + 32])
        loss = model(**encoded, labels=torch.as_tensor(targets[start : start + 32])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_model_artifact(model.eval(), tokenizer, meta, folder)
    return folder


@pytest.fixture(scope="module")
def models(experiment):
    from lepton_ray.artifacts import load_tokenizer

    tmp, frame = experiment["tmp"], experiment["train"]
    own = _trained_artifact(
        tmp / "own-tokenizer",
        _word_tokenizer(frame["text"].tolist()),
        frame,
        max_length=20,
        cleaning={"lowercase": True},
    )
    minilm = _trained_artifact(tmp / "minilm-trained", load_tokenizer("minilm"), frame, 32)
    return {"own_tokenizer": own, "minilm": minilm}


def _register(cfg, artifact, split: str, metrics: dict[str, float]) -> str:
    uri, name = cfg.tracking.tracking_uri, cfg.registered_model_name
    run = client(uri).create_run(ensure_experiment(cfg.tracking, cfg.experiment_name))
    candidate = versions.Candidate(
        metrics=metrics,
        metric_name=cfg.tune.metric,
        metric_mode=cfg.tune.mode,
        eval_split=split,
        peft_method="none",
    )
    version = versions.register(
        uri, name, run.info.run_id, artifact, {"lepton.config_hash": "c0ffee"}, candidate, log=quiet
    )
    return str(version.version)


def _champion(cfg) -> str | None:
    found = get_version_by_alias(cfg.tracking.tracking_uri, cfg.registered_model_name, "champion")
    return str(found.version) if found else None


def test_a_champion_with_another_tokenizer_is_scored_through_its_own(
    experiment, models, tiny_artifact
):
    cfg = _config(experiment, "own-tokenizer")
    this_split = gate.eval_split_id(experiment["manifest"])
    champion = _register(cfg, models["own_tokenizer"], OTHER_SPLIT, {"val_loss": 0.3})
    assert gate.settle(cfg, champion, log=quiet)  # the first version
    # A random model, however good the loss it claims on this experiment's split.
    challenger = _register(cfg, tiny_artifact, this_split, {"val_loss": 0.01})

    frame = read_split_frame(cfg, "validation", columns=["text", "label_id"])
    uri_of = f"models:/{cfg.registered_model_name}/{{}}".format
    scored, labels = gate.score_version(cfg, uri_of(champion), [frame])
    assert labels == TINY_LABELS and scored["examples"] == len(frame)
    assert scored["accuracy"] >= 0.8, scored  # read through its own words, lowercased
    random_scored, _ = gate.score_version(cfg, uri_of(challenger), [frame])
    assert random_scored["loss"] > scored["loss"]

    logged = []
    assert not gate.settle(cfg, challenger, log=logged.append)
    assert _champion(cfg) == champion
    reason = " ".join(logged)
    assert "not promoted" in reason and "each by its own preprocessing" in reason, reason
    assert f"{random_scored['loss']:.4f}" in reason and f"{scored['loss']:.4f}" in reason


def test_a_worse_challenger_is_refused_and_a_better_one_passes(experiment, models, tiny_artifact):
    cfg = _config(experiment, "worse-better")
    this_split = gate.eval_split_id(experiment["manifest"])
    name, uri = cfg.registered_model_name, cfg.tracking.tracking_uri
    good = _register(cfg, models["minilm"], OTHER_SPLIT, {"val_loss": 0.9})
    assert gate.settle(cfg, good, log=quiet)
    worse = _register(cfg, tiny_artifact, this_split, {"val_loss": 0.01})
    assert not gate.settle(cfg, worse, log=quiet)
    assert _champion(cfg) == good
    # The other way round: the trained model beats a random champion.
    versions.promote(uri, name, worse, force=True, log=quiet)
    better = _register(cfg, models["minilm"], OTHER_SPLIT, {"val_loss": 0.9})
    assert gate.settle(cfg, better, log=quiet)
    assert _champion(cfg) == better


def test_a_champion_with_other_labels_is_refused_naming_both(experiment, models, tmp_path):
    import shutil

    from lepton_ray.artifacts import ModelMeta

    cfg = _config(experiment, "other-labels")
    other = tmp_path / "other-labels"
    shutil.copytree(models["minilm"], other)
    meta = ModelMeta.load(other)
    meta.labels = ["bad", "good"]
    meta.save(other)
    champion = _register(cfg, other, OTHER_SPLIT, {"val_loss": 0.5})
    assert gate.settle(cfg, champion, log=quiet)
    this_split = gate.eval_split_id(experiment["manifest"])
    challenger = _register(cfg, models["minilm"], this_split, {"val_loss": 0.4})
    logged = []
    assert not gate.settle(cfg, challenger, log=logged.append)
    assert _champion(cfg) == champion
    reason = " ".join(logged)
    assert "['bad', 'good']" in reason and "['negative', 'positive']" in reason, reason


def _html(text: str) -> str:
    return f"<div><b>{text}</b></div>"


@pytest.fixture(scope="module")
def html_experiment(tmp_path_factory, ray_session):
    """An experiment that strips HTML from reviews that all carry some, and a champion
    trained on the reviews with their HTML (its own cleaning keeps it)."""
    import pandas as pd

    from lepton_ray.artifacts import load_tokenizer

    tmp = tmp_path_factory.mktemp("gate-html")
    csv = write_reviews_csv(tmp / "reviews.csv", n=300, seed=3)
    reviews = pd.read_csv(csv, keep_default_na=False)
    reviews["review"] = reviews["review"].map(_html)
    reviews.to_csv(tmp / "html.csv", index=False)
    raw = smoke_config(
        tmp,
        tmp / "html.csv",
        data={"clean": {"strip_html": True}},
        tune={"enabled": False, "metric": "val_loss"},
    )
    cfg = validate_experiment(raw)
    manifest = run_preprocess(cfg, log=quiet)
    assert manifest["raw_eval_text"] is True
    train = read_split_frame(cfg, "train")
    train["text"] = train["text"].map(_html)  # what the champion's own data held
    champion = _trained_artifact(
        tmp / "html-kept", load_tokenizer("minilm"), train, 48, cleaning={"strip_html": False}
    )
    return {"tmp": tmp, "raw": raw, "manifest": manifest, "champion": champion}


def test_a_champion_with_other_cleaning_is_scored_on_the_raw_texts(
    html_experiment, tiny_artifact, tmp_path
):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from lepton_ray.compress.formats import load_model_artifact
    from lepton_ray.tasks.base import encode_texts

    cfg = _config(html_experiment, "other-cleaning")
    split = gate.open_eval_split(cfg, "validation")
    assert split.columns == ["raw_text", "label_id"]
    frame = read_split_frame(cfg, "validation", columns=["text", "raw_text", "label_id"])
    assert frame["raw_text"].str.startswith("<div><b>").all()
    assert not frame["text"].str.contains("<").any()  # this experiment stripped the HTML

    model, tokenizer, meta = load_model_artifact(html_experiment["champion"])
    assert meta.cleaning["strip_html"] is False
    targets = torch.as_tensor(frame["label_id"].tolist())

    def direct(texts):
        encoded, _ = encode_texts(tokenizer, meta, texts)
        with torch.inference_mode():
            logits = model.eval()(**encoded).logits.float()
        loss = F.cross_entropy(logits, targets).item()
        return loss, (logits.argmax(dim=1) == targets).double().mean().item()

    raw_loss, raw_accuracy = direct(frame["raw_text"].tolist())
    cleaned_loss, _ = direct(frame["text"].tolist())
    assert abs(raw_loss - cleaned_loss) > 1e-3  # its cleaning keeps the HTML: other token ids

    this_split = gate.eval_split_id(html_experiment["manifest"])
    champion = _register(cfg, html_experiment["champion"], OTHER_SPLIT, {"val_loss": 0.3})
    assert gate.settle(cfg, champion, log=quiet)
    uri = f"models:/{cfg.registered_model_name}/{champion}"
    scored, _ = gate.score_version(cfg, uri, split)
    assert scored["examples"] == len(frame)
    assert scored["loss"] == pytest.approx(raw_loss, abs=1e-4)
    assert scored["accuracy"] == pytest.approx(raw_accuracy)
    # What the gate read before: this experiment's cleaned texts, its own cleaning on top.
    on_cleaned, _ = gate.score_version(cfg, uri, [frame[["text", "label_id"]]])
    assert on_cleaned["loss"] == pytest.approx(cleaned_loss, abs=1e-4)

    challenger = _register(cfg, tiny_artifact, this_split, {"val_loss": 0.01})
    logged = []
    assert not gate.settle(cfg, challenger, log=logged.append)
    assert f"{scored['loss']:.4f}" in " ".join(logged), logged

    # A data folder without the column (mask_pii set, or written before it existed): text.
    old = tmp_path / "old.parquet"
    pq.write_table(pa.table({"text": ["a"], "label_id": [0]}), old)
    assert gate.eval_columns(cfg, split.files) == ["raw_text", "label_id"]
    assert gate.eval_columns(cfg, [old]) == ["text", "label_id"]
    assert gate.eval_columns(cfg, [*split.files, old]) == ["text", "label_id"]
    assert gate.eval_columns(cfg) == ["text", "label_id"]
