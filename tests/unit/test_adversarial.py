"""``train.adversarial``: FGM and PGD on the embedded tokens, through the loop's own
``forward_backward``: the adversarial term is non-zero and added to the gradient, LoRA keeps
its embeddings frozen and untouched, PGD stays in the epsilon ball, only the last backward
syncs under DDP, and the adversarial loss reaches the reported metrics."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from lepton_ray.artifacts import build_model
from lepton_ray.config import ModelConfig, PeftSection, validate_experiment
from lepton_ray.tasks import get_task
from lepton_ray.train.adversarial import AdversarialTraining, input_embeddings, per_example_norm
from lepton_ray.train.loop import _forward_backward
from lepton_ray.train.parallel import unwrap
from lepton_ray.train.peft import apply_peft
from lepton_ray.train.precision import Precision
from lepton_ray.train.technique_setup import build_techniques
from lepton_ray.train.techniques import Techniques
from tests.conftest import TINY_BERT, TINY_LABELS, TINY_LLAMA, smoke_config

FP32 = Precision("fp32", "cpu", "test")
NO_DROPOUT = {"hidden": 0.0, "attention": 0.0}  # every pass sees the same network


def _bert(lora: bool):
    cfg = ModelConfig(
        name="minilm", random_init=True, config_overrides=TINY_BERT, dropout=NO_DROPOUT
    )
    model = build_model(cfg, "sequence_classification", TINY_LABELS, seed=0)
    if lora:
        peft = PeftSection(
            method="lora", lora={"r": 4, "lora_dropout": 0.0, "target_modules": ["query", "value"]}
        )
        model = apply_peft(model, peft, "sequence_classification")
    torch.manual_seed(1)
    ids = torch.randint(1000, 2000, (4, 10))
    mask = torch.ones_like(ids)
    mask[2:, 7:] = 0  # two padded rows
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}
    return model.train(), get_task("sequence_classification"), batch


def _llama():
    cfg = ModelConfig(
        name="smollm2",
        random_init=True,
        config_overrides=TINY_LLAMA,
        dropout={"attention": 0.0},
    )
    model = build_model(cfg, "causal_lm", [], seed=0)
    peft = PeftSection(
        method="lora", lora={"r": 4, "lora_dropout": 0.0, "target_modules": "all-linear"}
    )
    model = apply_peft(model, peft, "causal_lm")
    torch.manual_seed(1)
    ids = torch.randint(100, 5000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt is not trained on
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model.train(), get_task("causal_lm"), batch


def _grads(model) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def _run(model, task, batch, fn=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-step from zero gradients: the plain pass, or ``fn(model, forward_backward)``."""
    model.zero_grad(set_to_none=True)
    forward_backward = _forward_backward(model, task, batch, 1.0, FP32, None, Techniques())
    loss = forward_backward(True) if fn is None else fn(model, forward_backward)
    return loss, _grads(model)


def _with_delta(model, task, batch, delta):
    """The plain pass on embedded tokens moved by ``delta`` (the adversarial term alone)."""
    handle = input_embeddings(model).register_forward_hook(lambda m, a, out: out + delta)
    try:
        return _run(model, task, batch)
    finally:
        handle.remove()


def _embedding_grad(model, task, batch) -> torch.Tensor:
    """d loss / d embedded tokens, taken independently of the technique."""
    kept = {}

    def leaf(module, args, out):
        kept["x"] = out.detach().requires_grad_(True)
        return kept["x"]

    handle = input_embeddings(model).register_forward_hook(leaf)
    try:
        loss = task.loss(model(**task.model_inputs(batch, model)), batch)
        (grad,) = torch.autograd.grad(loss, kept["x"])
    finally:
        handle.remove()
    return grad


CASES = [("bert", False), ("bert", True), ("llama", True)]


@pytest.mark.parametrize(("kind", "lora"), CASES, ids=["bert-full", "bert-lora", "llama-lora"])
def test_fgm_adds_a_nonzero_adversarial_gradient_to_the_clean_one(kind, lora, request):
    if kind == "llama":
        request.getfixturevalue("smollm2_path")
    model, task, batch = _llama() if kind == "llama" else _bert(lora)
    embeddings = input_embeddings(model)
    weights_before = embeddings.weight.detach().clone()
    fgm = AdversarialTraining("fgm", epsilon=0.5)

    clean_loss, clean = _run(model, task, batch)
    returned, both = _run(model, task, batch, lambda m, fb: fgm.micro_step(m, fb, True))
    delta = fgm.last_delta
    adv_loss, adversarial = _with_delta(model, task, batch, delta)

    # The perturbation: epsilon along each example's normalised gradient (FGM).
    g = _embedding_grad(model, task, batch)
    assert torch.allclose(delta, 0.5 * g / per_example_norm(g), atol=1e-5)
    assert torch.allclose(per_example_norm(delta).flatten(), torch.full((len(delta),), 0.5))

    # The adversarial term is there, differs from the clean one, and is added to it.
    assert returned.item() == pytest.approx(clean_loss.item(), rel=1e-6)  # train_loss: clean
    assert fgm.metrics()["train_adv_loss"] == pytest.approx(adv_loss.item(), rel=1e-6)
    assert adv_loss.item() > clean_loss.item()  # a step up the loss
    assert both.keys() == clean.keys() == adversarial.keys() and clean
    for name in both:
        assert torch.allclose(both[name], clean[name] + adversarial[name], atol=1e-6), name
    assert any(not torch.allclose(adversarial[n], clean[n], atol=1e-6) for n in clean)

    # Nothing left behind: no hook, embeddings as they were (frozen under LoRA).
    assert not embeddings._forward_hooks
    assert torch.equal(embeddings.weight, weights_before)
    if lora:
        assert not embeddings.weight.requires_grad and embeddings.weight.grad is None
        # the adapter (and a classifier's new head) learn from both passes; the base does not
        assert any("lora_" in n for n in both)
        assert all("lora_" in n or "classifier" in n for n in both)


def test_pgd_stays_in_the_epsilon_ball_and_only_its_last_pass_adds_a_gradient():
    model, task, batch = _bert(lora=True)
    pgd = AdversarialTraining("pgd", epsilon=0.3, steps=4, alpha=0.2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    calls: list[bool] = []

    def step(m, forward_backward):
        def counted(sync):
            calls.append(sync)
            return forward_backward(sync)

        return pgd.micro_step(m, counted, True)

    _, clean = _run(model, task, batch)
    _, both = _run(model, task, batch, step)
    norms = per_example_norm(pgd.last_delta).flatten()
    assert torch.all(norms <= 0.3 + 1e-5)
    assert torch.allclose(norms, torch.full_like(norms, 0.3), atol=1e-5)  # 4 x 0.2 reaches it
    # clean, 3 inner ascent passes, the adversarial pass: only the last one syncs
    assert calls == [False, False, False, False, True]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    _, adversarial = _with_delta(model, task, batch, pgd.last_delta)
    for name in both:  # the inner passes left no gradient behind
        assert torch.allclose(both[name], clean[name] + adversarial[name], atol=1e-6), name

    # PGD's perturbation is not FGM's: the steps followed the gradient as it changed.
    fgm = AdversarialTraining("fgm", epsilon=0.3)
    _run(model, task, batch, lambda m, fb: fgm.micro_step(m, fb, True))
    assert not torch.allclose(pgd.last_delta, fgm.last_delta, atol=1e-4)


def test_fgm_under_bf16_autocast_and_a_grad_scaler():
    """The scaler's factor scales the embeddings' gradient and cancels in the step; under
    bf16 autocast the perturbation still goes up the loss."""
    model, task, batch = _bert(lora=True)
    deltas, grads = [], []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        fgm = AdversarialTraining("fgm", epsilon=0.5)
        model.zero_grad(set_to_none=True)
        fb = _forward_backward(model, task, batch, 1.0, FP32, scaler, Techniques())
        fgm.micro_step(model, fb, True)
        deltas.append(fgm.last_delta)
        grads.append(_grads(model))
    assert torch.allclose(deltas[0], deltas[1], atol=1e-5)
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], 1024.0 * g, rtol=1e-4, atol=1e-8), name

    bf16 = Precision("bf16", "cpu", "test")
    fgm = AdversarialTraining("fgm", epsilon=0.5)
    model.zero_grad(set_to_none=True)
    fb = _forward_backward(model, task, batch, 1.0, bf16, None, Techniques())
    clean = fgm.micro_step(model, fb, True)
    assert fgm.last_delta.dtype == torch.float32
    assert all(torch.isfinite(g).all() for g in _grads(model).values())
    assert fgm.metrics()["train_adv_loss"] > clean.item()


def test_config_builds_the_technique_and_the_loop_reports_its_loss(tmp_path):
    from lepton_ray.data.sample import make_reviews
    from lepton_ray.train.standalone import train_standalone
    from tests.unit.test_train_loop import write_tokenized

    data = tmp_path / "d.csv"
    data.write_text("review,sentiment\na,positive\n")
    raw = smoke_config(
        tmp_path,
        data,
        model={"dropout": NO_DROPOUT},
        train={
            "epochs": 1,
            "batch_size": 8,
            "gradient_accumulation_steps": 2,
            "max_steps_per_epoch": 2,
            "label_smoothing": 0.1,
            "adversarial": {"method": "pgd", "epsilon": 0.5, "pgd_steps": 2},
        },
    )
    cfg = validate_experiment(raw)
    techniques = build_techniques(cfg, None, get_task(cfg.task), torch.device("cpu"))
    (pgd,) = techniques.parts
    assert isinstance(pgd, AdversarialTraining)
    assert (pgd.steps, pgd.alpha, pgd.epsilon) == (2, 0.625, 0.5)

    rows = [r for r in make_reviews(60, seed=3) if r[0].strip()]
    manifest = write_tokenized(cfg, {"train": rows[:40], "validation": rows[40:]})
    result = train_standalone(cfg, manifest, tmp_path / "out", log=lambda _: None)
    (last,) = result["history"]
    assert last["train_adv_loss"] > 0 and last["train_adv_loss"] == last["train_adv_loss"]


# ------------------------------------------------------------------------------ DDP
def _tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config).train()


def _ddp_worker(rank: int, world: int, init: str, results: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        task = get_task("sequence_classification")
        torch.manual_seed(10 + rank)  # each rank its own batch
        batch = {
            "input_ids": torch.randint(1, 64, (3, 6)),
            "attention_mask": torch.ones(3, 6, dtype=torch.long),
            "labels": torch.randint(0, 2, (3,)),
        }
        model = torch.nn.parallel.DistributedDataParallel(_tiny_classifier())
        reductions = []

        def counting(state, bucket):
            reductions.append(1)
            fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0] / world)

        model.register_comm_hook(None, counting)
        fb = _forward_backward(model, task, batch, 1.0, FP32, None, Techniques())
        fb(True)  # a plain synced backward: how many all-reduces one sync takes
        per_sync = len(reductions)
        lines = []
        for method, options in (("fgm", {}), ("pgd", {"steps": 3, "alpha": 0.2})):
            # Alone (no DDP): this rank's gradient, then averaged over the ranks by hand.
            alone = _tiny_classifier()
            alone_fb = _forward_backward(alone, task, batch, 1.0, FP32, None, Techniques())
            AdversarialTraining(method, 0.5, **options).micro_step(alone, alone_fb, True)
            expected = {n: p.grad.clone() for n, p in alone.named_parameters()}
            for g in expected.values():
                dist.all_reduce(g)
                g /= world

            adversary = AdversarialTraining(method, 0.5, **options)
            model.zero_grad(set_to_none=True)
            reductions.clear()
            adversary.micro_step(model, fb, False)  # an accumulation micro-step: no sync
            unsynced = len(reductions)
            model.zero_grad(set_to_none=True)
            reductions.clear()
            adversary.micro_step(model, fb, True)
            got = {n: p.grad for n, p in unwrap(model).named_parameters()}
            ok = all(torch.allclose(got[n], expected[n], atol=1e-6) for n in expected)
            lines.append(f"{method} {per_sync} {unsynced} {len(reductions)} {ok}\n")
        with open(os.path.join(results, f"{rank}.txt"), "w") as out:
            out.writelines(lines)
    finally:
        dist.destroy_process_group()


def test_under_ddp_only_the_last_backward_syncs_and_the_gradient_is_the_ranks_mean():
    """Two gloo processes on a tiny BERT, FGM and PGD: the clean (and PGD's inner) passes of
    a micro-batch never all-reduce, the last one once, and the synced gradient is the mean
    over the ranks of each rank's own clean + adversarial gradient."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        mp.spawn(_ddp_worker, args=(2, init, tmp), nprocs=2, join=True)
        for rank in (0, 1):
            with open(os.path.join(tmp, f"{rank}.txt")) as f:
                rows = [line.split() for line in f.read().splitlines()]
            assert [r[0] for r in rows] == ["fgm", "pgd"]
            for _, per_sync, unsynced, synced, ok in rows:
                assert int(per_sync) >= 1
                assert int(unsynced) == 0  # no sync on an accumulation micro-step
                assert int(synced) == int(per_sync)  # one sync: clean + adversarial together
                assert ok == "True"
