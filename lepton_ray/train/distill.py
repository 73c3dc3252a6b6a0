"""Knowledge distillation (``train.distill``): a teacher's soft targets in the student's loss.

A :class:`Distillation` technique (``techniques.py``) changes each micro-batch's loss to::

    alpha * T**2 * KL(teacher_T || student_T) + (1 - alpha) * task loss

where the KL is the task's (``Task.distill_loss``: over the class logits, or token-level
over the vocabulary at the positions the task's loss trains on). The teacher is loaded once
per worker, onto the worker's own device, and runs in eval mode under ``torch.no_grad`` in
the same autocast as the student's forward pass; its inputs are the student's batch, made
model inputs for the teacher (``Task.model_inputs``: a packed row's attention follows the
teacher's own kernel). The KL and the task loss are reported with every evaluation as
``train_distill_kl`` and ``train_task_loss``.

Where the teacher comes from (``train.distill.teacher``): an artifact or checkpoint folder
every worker reads, or a registered version (``models:/NAME/VERSION``,
``models:/NAME@ALIAS``) that every worker downloads from the MLflow store itself, as Serve
replicas do: a worker on another node shares no filesystem with the driver. Each worker
resolves an alias when it starts.

Checks (:func:`check_teacher`): the teacher is a float model of the experiment's task with
the student's labels, in the same order, and the student's tokenizer vocabulary (the teacher
reads the student's token ids). ``lepton-ray validate`` runs them where it can (the labels
once the data is preprocessed; only the teacher's ``lepton_model.json`` and tokenizer are
downloaded); the train stage's preflight runs them before any worker starts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lepton_ray.artifacts import ARTIFACT_KEY, META_FILE, ModelMeta, load_float_artifact
from lepton_ray.errors import ConfigError, LeptonError
from lepton_ray.train.techniques import RunningMean, Technique, metrics_of

KEY = "train.distill.teacher"
FLOAT_WEIGHTS = ("adapter", "full", "bf16")
KL_METRIC = "train_distill_kl"
TASK_LOSS_METRIC = "train_task_loss"
_WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".pt", ".bin")


class Distillation(Technique):
    """The teacher term of one worker's loss; ``teacher`` is on the student's device."""

    name = "distill"

    def __init__(self, teacher: torch.nn.Module, task, temperature: float, alpha: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.task = task
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self._means = {KL_METRIC: RunningMean(), TASK_LOSS_METRIC: RunningMean()}

    def teacher_outputs(self, batch: dict[str, torch.Tensor]):
        """The teacher's forward pass on a collated batch: eval mode, no gradient."""
        if self.teacher.training:  # nothing may turn dropout on in the teacher
            self.teacher.eval()
        with torch.no_grad():
            inputs = self.task.model_inputs(batch, self.teacher)
            return self.teacher(**{k: v for k, v in inputs.items() if k != "labels"})

    def loss(self, model, batch, inputs, outputs, loss):
        kl = self.task.distill_loss(outputs, self.teacher_outputs(batch), batch, self.temperature)
        self._means[KL_METRIC].add(kl.detach())
        self._means[TASK_LOSS_METRIC].add(loss.detach())
        if self.alpha == 0.0:  # exactly the task loss (the KL is still measured)
            return loss
        return self.alpha * self.temperature**2 * kl + (1.0 - self.alpha) * loss

    def metrics(self) -> dict[str, float]:
        return metrics_of(self._means)

    def reset(self) -> None:
        for mean in self._means.values():
            mean.reset()


# ------------------------------------------------------------------------- the teacher
def build_distillation(cfg, task, device, rank: int = 0, log=print) -> Distillation:
    """This worker's :class:`Distillation`: the teacher loaded (downloaded) onto ``device``."""
    from lepton_ray.train.precision import resolve_precision

    distill = cfg.train.distill
    with tempfile.TemporaryDirectory(prefix="lepton-teacher-") as tmp:
        folder = teacher_folder(cfg, Path(tmp), weights=True)
        meta = ModelMeta.load(folder)
        _refuse(teacher_problems(cfg, meta, None, None, distill.teacher))
        teacher, _, _ = load_float_artifact(folder, merge=True)
    if resolve_precision(cfg.train.precision, device).dtype is None:
        teacher = teacher.float()  # fp32 training: the teacher too (a bf16 artifact)
    if hasattr(teacher.config, "use_cache"):
        teacher.config.use_cache = False  # one forward pass per batch; no KV cache to keep
    teacher = teacher.to(device)
    if rank == 0:
        params = sum(p.numel() for p in teacher.parameters())
        log(
            f"[train] distill: teacher {distill.teacher} ({meta.weights}, {params:,} weights), "
            f"temperature {distill.temperature}, alpha {distill.alpha}"
        )
    return Distillation(teacher, task, distill.temperature, distill.alpha)


def pin_teacher(cfg, log: Callable[[str], None] = print):
    """The config with a registered teacher named by its version: an alias (``@champion``)
    is resolved once, in the driver, so that every worker and every restart of one loads
    the same teacher even when the alias moves during the run. Unchanged otherwise."""
    distill = cfg.train.distill
    if distill is None or not distill.from_registry:
        return cfg
    from lepton_ray.config import apply_overrides
    from lepton_ray.tracking.mlflow import get_model_version, parse_spec

    spec = distill.teacher.strip()
    name, _, version = parse_spec(spec)
    if version is not None:
        return cfg
    try:
        found = get_model_version(cfg.tracking.tracking_uri, spec)
    except LeptonError as err:
        raise ConfigError(f"{KEY} {spec}: {err}") from None
    pinned = f"models:/{name}/{found.version}"
    log(f"[train] distill: teacher {spec} is {pinned}; every worker loads that version")
    return apply_overrides(cfg, {"train.distill.teacher": pinned})


def teacher_folder(cfg, dst: Path, weights: bool = True) -> Path:
    """The teacher's artifact folder: the configured one, or the registered version
    downloaded into ``dst`` (with ``weights=False`` only ``lepton_model.json`` and the
    tokenizer files). One ``ConfigError`` naming the key when it is not there."""
    spec = cfg.train.distill.teacher.strip()
    if not cfg.train.distill.from_registry:
        folder = Path(spec).expanduser()
        if not (folder / META_FILE).is_file():
            raise ConfigError(
                f"{KEY}: {spec} is not a lepton-ray model artifact or checkpoint folder (no "
                f"{META_FILE}); name one, or a registered version as models:/NAME/VERSION "
                "or models:/NAME@ALIAS"
            )
        return folder
    from mlflow.exceptions import MlflowException

    from lepton_ray.tracking.mlflow import download_model, get_model_version, redact_uri

    uri = cfg.tracking.tracking_uri
    try:
        if weights:
            return download_model(uri, spec, dst)
        return _download_card(uri, get_model_version(uri, spec).source, dst)
    except LeptonError as err:
        raise ConfigError(f"{KEY} {spec}: {err}") from None
    except (MlflowException, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{KEY} {spec}: could not download it from {redact_uri(uri)}: {redact_uri(first)}"
        ) from None


def _download_card(uri: str, source: str, dst: Path) -> Path:
    """Download the top-level files of a registered version's artifact, weights left out:
    what the checks read, without the model."""
    import mlflow.artifacts

    def listing(root: str) -> dict[str, bool]:
        found = mlflow.artifacts.list_artifacts(artifact_uri=root, tracking_uri=uri)
        return {Path(f.path).name: f.is_dir for f in found or []}

    root = source.rstrip("/")
    files = listing(root)
    if META_FILE not in files and "MLmodel" in files:
        # An MLflow pyfunc package keeps the artifact inside (as ``artifacts.artifact_folder``).
        inner = f"{root}/artifacts"
        names = sorted((n for n, d in listing(inner).items() if d), key=lambda n: n != ARTIFACT_KEY)
        for name in names:
            found = listing(f"{inner}/{name}")
            if META_FILE in found:
                root, files = f"{inner}/{name}", found
                break
    if META_FILE not in files:
        raise ConfigError(f"{KEY}: the registered version at {source} holds no {META_FILE}")
    dst.mkdir(parents=True, exist_ok=True)
    for name, is_dir in files.items():
        if not is_dir and not name.endswith(_WEIGHT_SUFFIXES):
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/{name}", dst_path=str(dst), tracking_uri=uri
            )
    return dst


# ------------------------------------------------------------------------- checks
def teacher_problems(
    cfg, meta: ModelMeta, tokenizer, labels: Sequence[str] | None, where: str
) -> list[str]:
    """What makes the teacher at ``where`` unfit for ``cfg``'s student, each naming the keys.

    ``labels``: the student's (the data's), or None where not known yet; ``tokenizer``: the
    teacher's, or None to leave the vocabulary unchecked.
    """
    problems: list[str] = []
    if meta.task != cfg.task:
        problems.append(
            f"{KEY}: {where} is a {meta.task} model; it cannot teach the student of task {cfg.task}"
        )
        return problems  # labels and logits mean different things: nothing else to compare
    if meta.weights not in FLOAT_WEIGHTS:
        problems.append(
            f"{KEY}: {where} holds {meta.weights} weights; a teacher must have float weights "
            f"({', '.join(FLOAT_WEIGHTS)}): name the version it was compressed from"
        )
    if labels is not None and list(meta.labels) != list(labels):
        problems.append(
            f"{KEY}: the teacher's label map {list(meta.labels)} differs from the student's "
            f"{list(labels)} (the classes of data.label_column, in order); class i of one "
            "must be class i of the other"
        )
    if tokenizer is not None:
        from lepton_ray.artifacts import load_tokenizer

        mismatch = vocabulary_mismatch(tokenizer, load_tokenizer(cfg.model.name))
        if mismatch:
            problems.append(
                f"{KEY}: the teacher's tokenizer vocabulary differs from the student's "
                f"(model.name {cfg.model.name}): {mismatch}; the teacher reads the student's "
                "token ids, so both must share one vocabulary"
            )
    return problems


def vocabulary_mismatch(teacher, student) -> str | None:
    """How two tokenizers' vocabularies (token -> id, added tokens included) differ; None
    when they are the same."""
    a, b = teacher.get_vocab(), student.get_vocab()
    if a == b:
        return None
    if len(a) != len(b):
        return f"{len(a)} tokens against {len(b)}"
    token = next(t for t in sorted(a) if b.get(t) != a[t])
    return f"token {token!r} is id {a[token]} in the teacher's, {b.get(token)} in the student's"


def check_teacher(cfg, labels: Sequence[str] | None) -> None:
    """Refuse, in one ``ConfigError``, a teacher unfit for ``cfg``'s student (see
    :func:`teacher_problems`); reads only the teacher's meta and tokenizer."""
    from transformers import AutoTokenizer

    if cfg.train.distill is None:
        return
    where = cfg.train.distill.teacher
    with tempfile.TemporaryDirectory(prefix="lepton-teacher-card-") as tmp:
        folder = teacher_folder(cfg, Path(tmp), weights=False)
        try:
            meta = ModelMeta.load(folder)
        except LeptonError as err:
            raise ConfigError(f"{KEY}: {err}") from None
        tokenizer = AutoTokenizer.from_pretrained(folder)
        _refuse(teacher_problems(cfg, meta, tokenizer, labels, where))


def check_distill_early(cfg, log: Callable[[str], None] | None = None) -> None:
    """``lepton-ray validate``'s teacher check: the labels are compared where this config's
    data is already preprocessed (its manifest), else at the train stage's preflight."""
    if cfg.train.distill is None:
        return
    from lepton_ray.data.preprocess import load_manifest

    try:
        labels: list[str] | None = list(load_manifest(cfg)["labels"])
    except (LeptonError, OSError, ValueError, KeyError):
        labels = None
        if log is not None:
            log(f"{KEY}: labels checked at training (the data is not preprocessed yet)")
    check_teacher(cfg, labels)


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


__all__ = [
    "Distillation",
    "KL_METRIC",
    "TASK_LOSS_METRIC",
    "build_distillation",
    "check_distill_early",
    "check_teacher",
    "teacher_folder",
    "teacher_problems",
    "vocabulary_mismatch",
]
