"""The training loop: plain torch, no Ray.

It runs inside a Ray Train worker (``worker.py``), under torchrun, or in one process
(``standalone.py``), so GPU paths can be checked on a machine that has torch but no Ray.

Everything random is a function of counters in the checkpoint: the batch order of an
epoch of (seed, epoch, rank) (``batching.py``) and dropout of (seed, rank, optimizer step),
re-seeded before every step. So a run resumed from any checkpoint continues exactly as the
uninterrupted run would have, and two runs with the same seed give the same metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lepton_ray.tasks import Task
from lepton_ray.train.batching import TokenRows, epoch_batches
from lepton_ray.train.parallel import distributed, gradient_sync, unwrap
from lepton_ray.train.precision import Precision
from lepton_ray.train.techniques import Technique, Techniques


@dataclass
class LoopState:
    """Where training is: what a checkpoint must hold to resume at the right step."""

    epoch: int = 0  # the epoch in progress (0-based); == epochs when done
    batch: int = 0  # micro-batches of that epoch already trained on
    step: int = 0  # optimizer steps done in all
    best: float | None = None
    best_step: int | None = None
    stale: int = 0  # evaluations since the metric last improved by min_delta
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        known = {k: saved[k] for k in cls.__dataclass_fields__ if k in saved}
        return cls(**known)


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    batch_size: int
    accumulation: int = 1
    max_grad_norm: float | None = 1.0
    max_steps_per_epoch: int | None = None
    eval_every_steps: int | None = None
    log_every_steps: int = 10
    patience: int | None = None
    min_delta: float = 0.0
    metric: str = "val_accuracy"
    mode: str = "max"
    seed: int = 42
    group_by_length: bool = True
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> LoopSettings:
        t = cfg.train
        return cls(
            epochs=t.epochs,
            batch_size=t.batch_size,
            accumulation=t.gradient_accumulation_steps,
            max_grad_norm=t.max_grad_norm,
            max_steps_per_epoch=t.max_steps_per_epoch,
            eval_every_steps=t.eval_every_steps,
            log_every_steps=t.log_every_steps,
            patience=t.early_stopping.patience,
            min_delta=t.early_stopping.min_delta,
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            seed=t.seed,
            group_by_length=t.group_by_length,
            label_smoothing=t.label_smoothing,
        )

    def micro_batches(self, rows: int) -> int:
        """Forward passes per epoch on a worker holding ``rows`` rows."""
        n = math.ceil(rows / self.batch_size)
        if self.max_steps_per_epoch:
            n = min(n, self.max_steps_per_epoch * self.accumulation)
        return max(n, 1)

    def steps_per_epoch(self, rows: int) -> int:
        return math.ceil(self.micro_batches(rows) / self.accumulation)


def is_lora_b(name: str) -> bool:
    """A LoRA B matrix (what LoRA+ trains at a larger learning rate). Here, not with the
    PEFT code: the loop loads without the config (and pydantic) on a bare GPU machine."""
    return ".lora_B." in name or ".lora_embedding_B." in name


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    loraplus_lr_ratio: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW over trainable weights; biases and normalization weights are not decayed.
    With ``loraplus_lr_ratio`` (LoRA+), the LoRA B matrices get groups of their own at
    ``lr`` times it (the schedule scales every group alike).

    The fused kernel is used where every weight is a plain CPU or CUDA tensor: on a 2-core
    CPU it cut MiniLM's full fine-tuning optimizer step from 138 ms to 25 ms (of a 512 ms
    step). Sharded (FSDP2 DTensor) weights keep the default multi-tensor path.
    """
    decay, no_decay, b_decay, b_no_decay = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lora_b = loraplus_lr_ratio is not None and is_lora_b(name)
        if param.ndim < 2 or "norm" in name.lower():
            (b_no_decay if lora_b else no_decay).append(param)
        else:
            (b_decay if lora_b else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if loraplus_lr_ratio is not None:
        b_lr = lr * loraplus_lr_ratio
        groups += [
            {"params": b_decay, "weight_decay": weight_decay, "lr": b_lr},
            {"params": b_no_decay, "weight_decay": 0.0, "lr": b_lr},
        ]
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
        for p in params
    )
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate multiplier at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float, schedule: str = "linear"):
    """Linear warm-up over ``warmup_ratio`` of the steps, then constant, linear or cosine."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, schedule)
    )


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def step_seed(seed: int, rank: int, step: int) -> int:
    """Dropout's seed for one optimizer step: a pure function of where training is."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


Report = Callable[[dict[str, Any], bool, LoopState], None]

PLOT_INPUTS = "plot_inputs"
"""Key of an evaluation report that holds what the task plots (not a metric)."""


def run_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    rows: TokenRows,
    *,
    pad_id: int,
    eval_batches: Callable[[], Any],
    task: Task,
    labels: Sequence[str],
    settings: LoopSettings,
    state: LoopState,
    device: torch.device,
    precision: Precision,
    rank: int = 0,
    world_size: int = 1,
    on_evaluation: Report | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
    techniques: Technique | None = None,
) -> LoopState:
    """Train from ``state`` to the last epoch (or an early stop), evaluating as configured.

    ``on_evaluation(metrics, improved, state)`` runs on every rank after every evaluation
    (Ray Train's report is a barrier); ``metrics`` are the same on every rank. ``on_log``
    gets the running train loss and learning rate every ``log_every_steps`` steps (rank 0).
    ``techniques`` (``techniques.py``) hook adversarial training, distillation and the like
    into each step; their running loss terms are reported with each evaluation.
    """
    s = settings
    hooks = techniques if techniques is not None else Techniques()
    multi = distributed(world_size)
    scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
    micro_total = s.micro_batches(len(rows))
    steps_per_epoch = s.steps_per_epoch(len(rows))
    lengths = rows.lengths
    window = _Window(device)

    def evaluate_now(epoch_done: bool) -> bool:
        """Evaluate, report; True when early stopping says stop."""
        window.reduce(multi)
        val = task.evaluate(
            unwrap(model),
            eval_batches(),
            labels,
            device,
            rank,
            world_size,
            autocast=precision.autocast,
        )
        metrics = {
            "epoch": state.epoch + (0 if epoch_done else state.batch / micro_total),
            "step": state.step,
            "train_loss": window.loss(),
            **{f"val_{name}": value for name, value in task.reported(val).items()},
            "lr": scheduler.get_last_lr()[0],
            "train_samples_per_s": window.samples_per_s(),
            "train_tokens_per_s": window.tokens_per_s(),
            "train_seconds": window.seconds,
            "padding_fraction": window.padding(),
            **hooks.metrics(),
        }
        window.reset()
        hooks.reset()
        improved = is_better(metrics[s.metric], state.best, s.mode)
        if improved:
            state.best, state.best_step = metrics[s.metric], state.step
        if is_better(metrics[s.metric], _previous_best(state, s), s.mode, s.min_delta):
            state.stale = 0
        else:
            state.stale += 1
        state.history.append({k: float(v) for k, v in metrics.items()})
        stop = bool(s.patience and state.stale >= s.patience)
        state.stopped_early = stop
        if rank == 0:
            log(
                f"[train] step {state.step} (epoch {metrics['epoch']:.2f}): "
                f"train_loss {metrics['train_loss']:.4f} {task.summary(val)}"
                + (" (best)" if improved else "")
                + (f" - early stop: no gain for {state.stale} evaluations" if stop else "")
            )
        if on_evaluation is not None:
            on_evaluation({**metrics, PLOT_INPUTS: task.plot_inputs(val)}, improved, state)
        return stop

    while state.epoch < s.epochs and not state.stopped_early:
        batches = epoch_batches(rows, s.batch_size, s.seed, state.epoch, rank, s.group_by_length)[
            :micro_total
        ]
        model.train()
        for step_in_epoch in range(state.batch // s.accumulation, steps_per_epoch):
            first = step_in_epoch * s.accumulation
            micro = batches[first : first + s.accumulation]
            torch.manual_seed(step_seed(s.seed, rank, state.step))
            started = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64)
            # Each micro-batch's mean loss counts by its weight (examples; a language model's
            # trained tokens), so the step's gradient is that of the mean over all of the
            # step's examples (tokens) on every rank together: the epoch's short last batch
            # weighs what its rows weigh, not a full batch's.
            targets = [rows.targets_of(index) for index in micro]
            weights = [task.weight(t) for t in targets]
            per_example = example_weight(sum(weights), multi, world_size, device)
            for j, index in enumerate(micro):
                batch = task.collate(rows.sequences(index), targets[j], pad_id)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                forward_backward = _forward_backward(
                    model,
                    task,
                    batch,
                    weights[j] * per_example,
                    precision,
                    scaler,
                    hooks,
                    s.label_smoothing,
                )
                mean_loss = hooks.micro_step(
                    model, forward_backward, not multi or j == len(micro) - 1
                )
                loss_sum += mean_loss.double().cpu() * weights[j]
            if scaler:
                scaler.unscale_(optimizer)
            if s.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            hooks.after_step(model, state.step + 1)
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch = first + len(micro)
            window.add(micro, lengths, loss_sum, time.perf_counter() - started, sum(weights))
            if rank == 0 and state.step % s.log_every_steps == 0:
                lr = scheduler.get_last_lr()[0]
                log(
                    f"[train] epoch {state.epoch + 1}/{s.epochs} step {step_in_epoch + 1}/"
                    f"{steps_per_epoch} loss {window.running_loss():.4f} lr {lr:.2e} "
                    f"{window.local_rate() * world_size:.1f} samples/s"
                )
                if on_log is not None:
                    on_log(state.step, {"train_loss_step": window.running_loss(), "lr": lr})
            last = step_in_epoch == steps_per_epoch - 1
            if (
                s.eval_every_steps
                and state.step % s.eval_every_steps == 0
                and not last
                and evaluate_now(epoch_done=False)
            ):
                return state
        state.epoch += 1
        state.batch = 0
        if evaluate_now(epoch_done=True):
            return state
    return state


def _forward_backward(
    model, task: Task, batch, factor: float, precision, scaler, hooks, label_smoothing=0.0
):
    """One micro-batch's forward and backward pass, the gradient all-reduce on or off: what
    a technique's ``micro_step`` calls (more than once, for adversarial training)."""

    def run(sync: bool) -> torch.Tensor:
        # The backward pass inside gradient_sync (FSDP2 reads the switch there), outside
        # autocast (backward runs in the forward's dtypes anyway).
        with gradient_sync(model, sync):
            with precision.autocast():
                inputs = task.model_inputs(batch, model)
                out = model(**inputs)
                task_loss = task.loss(out, batch, label_smoothing)
                mean_loss = hooks.loss(model, batch, inputs, out, task_loss)
            loss = mean_loss.float() * factor
            (scaler.scale(loss) if scaler else loss).backward()
        return mean_loss.detach()

    return run


def example_weight(examples: int, multi: bool, world_size: int, device: torch.device) -> float:
    """What one example's loss is multiplied by so that a step's gradient is the mean over
    every example of the step: ``1 / examples`` on one rank; with several, the step's
    examples are summed over the ranks (they differ when a rank's short last batch falls
    in another step) and multiplied by the world size, which DDP's and FSDP's gradient
    averaging divides by again."""
    if not multi:
        return 1.0 / max(examples, 1)
    total = torch.tensor([examples], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total)
    return world_size / max(int(total.item()), 1)


def _previous_best(state: LoopState, s: LoopSettings) -> float | None:
    """The best metric before the latest evaluation (for early stopping's min_delta)."""
    values = [h[s.metric] for h in state.history]
    if not values:
        return None
    pick = max if s.mode == "max" else min
    clean = [v for v in values if not math.isnan(v)]
    return pick(clean) if clean else None


class _Window:
    """Train loss and throughput since the last evaluation (summed over ranks at reduce)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        # loss*weight, rows, tokens, slots, seconds, weight
        self.sums = torch.zeros(6, dtype=torch.float64)
        self.reduced: torch.Tensor | None = None
        self.seconds = 0.0
        self._recent: list[float] = []

    def add(self, micro, lengths, loss_sum, seconds: float, weight: float | None = None) -> None:
        rows = sum(len(i) for i in micro)
        weight = rows if weight is None else weight
        tokens = sum(int(lengths[i].sum()) for i in micro)
        slots = sum(int(lengths[i].max()) * len(i) for i in micro if len(i))
        self.sums += torch.tensor(
            [float(loss_sum), rows, tokens, slots, seconds, weight], dtype=torch.float64
        )
        self.seconds += seconds
        self._recent.append(float(loss_sum) / max(weight, 1))

    def reduce(self, multi: bool) -> None:
        total = self.sums.clone()
        if multi:
            # Seconds: the slowest rank sets the pace; the rest are summed.
            seconds = total[4].clone().to(self.device)
            rest = torch.cat([total[:4], total[5:]]).to(self.device)
            torch.distributed.all_reduce(rest)
            torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
            rest = rest.cpu()
            total = torch.cat([rest[:4], seconds.cpu().view(1), rest[4:]])
        self.reduced = total
        self.seconds = float(total[4])

    def _total(self) -> torch.Tensor:
        return self.reduced if self.reduced is not None else self.sums

    def loss(self) -> float:
        t = self._total()
        return float(t[0] / t[5]) if t[5] else float("nan")

    def samples_per_s(self) -> float:
        t = self._total()
        return float(t[1] / t[4]) if t[4] else 0.0

    def tokens_per_s(self) -> float:
        t = self._total()
        return float(t[2] / t[4]) if t[4] else 0.0

    def padding(self) -> float:
        t = self._total()
        return float(1 - t[2] / t[3]) if t[3] else 0.0

    def running_loss(self) -> float:
        recent = self._recent[-50:]
        return sum(recent) / len(recent) if recent else float("nan")

    def local_rate(self) -> float:
        return float(self.sums[1] / self.sums[4]) if self.sums[4] else 0.0


__all__ = [
    "LoopSettings",
    "LoopState",
    "build_optimizer",
    "build_scheduler",
    "example_weight",
    "is_better",
    "lr_factor",
    "run_training",
    "step_seed",
]
