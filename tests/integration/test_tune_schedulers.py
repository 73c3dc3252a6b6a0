"""The trial schedulers on real Tune runs, with function trainables (seconds, not minutes)."""

import signal

import pytest

from lepton_ray.tune.schedulers import hyperband

pytestmark = pytest.mark.slow

HANG_GUARD_S = 180  # the sweep takes seconds; this only bounds a hang


def _trainable(config):
    from ray import tune

    if config["kind"] == "fails":
        raise RuntimeError("this trial cannot train")
    for epoch in (1, 2):
        tune.report({"epoch": epoch, "acc": 0.5 + 0.1 * epoch})


def test_hyperband_ends_when_the_only_bracket_peer_fails(ray_session, tmp_path):
    """Two trials share HyperBand's one full-length bracket. The good one reaches the
    milestone and is paused for its peer, which then fails (after its retry). Tune's own
    HyperBand left the good trial paused and the sweep never ended."""
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": 0.5}),
        param_space={"kind": tune.grid_search(["good", "fails"])},
        tune_config=tune.TuneConfig(
            metric="acc",
            mode="max",
            scheduler=hyperband(time_attr="epoch", max_t=2, reduction_factor=2),
        ),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path),
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=0,
        ),
    )

    # With the bug, fit() never returns: a hang guard turns that into a failure.
    def hung(*_):
        raise TimeoutError("the sweep did not end: a trial was left paused")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_GUARD_S)
    try:
        results = tuner.fit()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    by_kind = {r.config["kind"]: r for r in results}
    assert by_kind["good"].metrics["epoch"] == 2 and by_kind["good"].error is None
    assert "cannot train" in str(by_kind["fails"].error)
