"""tune.space: conditional parameters, ratios, every searcher, and the one-line refusals
`lepton-ray validate` gives before any trial starts."""

from __future__ import annotations

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from lepton_ray.cli import app
from lepton_ray.config import validate_experiment
from lepton_ray.config.space import compile_space
from lepton_ray.errors import ConfigError
from lepton_ray.tune.report import TrialTable, best_config_yaml, optuna_figures
from lepton_ray.tune.space import (
    DefineByRun,
    dimensions,
    first_point,
    sampler,
    searcher_values,
    study_of,
)
from tests.conftest import smoke_config, write_yaml

runner = CliRunner()

BRANCHED = {
    "peft.method": {"type": "choice", "values": ["lora", "none"]},
    "train.lr": [
        {"type": "loguniform", "low": 1e-4, "high": 1e-2, "when": {"peft.method": "lora"}},
        {"type": "loguniform", "low": 1e-5, "high": 1e-4, "when": {"peft.method": "none"}},
    ],
    "peft.lora.r": {
        "type": "int",
        "low": 2,
        "high": 32,
        "log": True,
        "when": {"peft.method": "lora"},
    },
    "peft.lora.lora_alpha": {
        "ratio_of": "peft.lora.r",
        "values": [1, 2, 4],
        "when": {"peft.method": "lora"},
    },
    "train.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1, "step": 0.05},
}


def _raw(tmp_path, space, **tune):
    (tmp_path / "reviews.csv").write_text("review,sentiment\ngood,1\nbad,0\n")
    return smoke_config(
        tmp_path,
        tmp_path / "reviews.csv",
        train={"epochs": 2, "lr": 1e-3},
        tune={"enabled": True, "num_samples": 8, "space": space, **tune},
    )


def _cfg(tmp_path, space=BRANCHED, **tune):
    return validate_experiment(_raw(tmp_path, space, **tune), check_files=False)


def _sampled(cfg, trials: int):
    """The values of ``trials`` trials asked of the sweep's own sampler over its space, each
    told a made-up result (so model-based searchers leave their random start)."""
    dims = dimensions(cfg)
    space = DefineByRun(dims, cfg.model_dump(mode="json"))
    study = optuna.create_study(sampler=sampler(cfg.tune, dims), direction="maximize")
    for i in range(trials):
        trial = study.ask()
        yield space(trial)
        study.tell(trial, (i % 5) / 5)


@pytest.mark.parametrize("search", ["tpe", "random", "gp", "cmaes"])
def test_no_trial_gets_a_parameter_of_a_branch_it_did_not_take(tmp_path, search):
    cfg = _cfg(tmp_path, search=search)
    seen = set()
    for values in _sampled(cfg, 14):
        seen.add(values["peft.method"])
        if values["peft.method"] == "none":
            assert set(values) == {"peft.method", "train.lr", "train.weight_decay"}
            assert 1e-5 <= values["train.lr"] <= 1e-4
        else:
            assert 1e-4 <= values["train.lr"] <= 1e-2
            assert values["peft.lora.lora_alpha"] in [values["peft.lora.r"] * k for k in (1, 2, 4)]
            assert isinstance(values["peft.lora.lora_alpha"], int)
        assert values["train.weight_decay"] in (0.0, 0.05, 0.1)
        # The config each trial trains with accepts the values.
        from lepton_ray.config import apply_overrides

        apply_overrides(cfg, values)
    assert seen == {"lora", "none"}


def test_each_searcher_is_seeded(tmp_path):
    for search in ("tpe", "random", "gp", "cmaes"):
        runs = []
        for _ in range(2):
            cfg = _cfg(tmp_path, search=search, seed=7)
            dims = dimensions(cfg)
            study = optuna.create_study(sampler=sampler(cfg.tune, dims), direction="maximize")
            space = DefineByRun(dims, cfg.model_dump(mode="json"))
            points = []
            for i in range(5):
                trial = study.ask()
                points.append(space(trial))
                study.tell(trial, i / 5)
            runs.append(points)
        assert runs[0] == runs[1], search


def test_grid_search_visits_every_point_once(tmp_path):
    space = {
        "train.lr": {"type": "grid", "values": [1e-3, 2e-3]},
        "peft.lora.r": {"type": "grid", "values": [4, 8, 16]},
    }
    cfg = _cfg(tmp_path, space, search="grid", num_samples=6)
    dims = dimensions(cfg)
    study = optuna.create_study(sampler=sampler(cfg.tune, dims), direction="maximize")
    space_fn = DefineByRun(dims, cfg.model_dump(mode="json"))
    points = set()
    for _ in range(6):
        trial = study.ask()
        points.add(tuple(sorted(space_fn(trial).items())))
        try:
            study.tell(trial, 0.5)
        except RuntimeError as err:  # the grid is done: Optuna asks the study to stop
            assert "stop" in str(err) and len(points) == 6
    assert len(points) == 6


@pytest.mark.parametrize("search", ["grid", "tpe", "random"])
def test_a_choice_of_lists_reaches_trials_as_lists_and_optuna_as_labels(tmp_path, search):
    """Optuna's choices must be None, bools, numbers or strings: a list of target modules
    goes to Optuna as its JSON, and back to the trial as the list itself."""
    targets = [["query", "value"], ["query"], ["key", "query", "value"]]
    kind = "grid" if search == "grid" else "choice"
    space = {"peft.lora.target_modules": {"type": kind, "values": targets}}
    cfg = _cfg(tmp_path, space, search=search, num_samples=3)
    dims = dimensions(cfg)
    study = optuna.create_study(sampler=sampler(cfg.tune, dims), direction="maximize")
    space_fn = DefineByRun(dims, cfg.model_dump(mode="json"))
    seen, labels = [], []
    for i in range(3 if search == "grid" else 12):
        trial = study.ask()
        value = space_fn(trial)["peft.lora.target_modules"]
        assert value in targets and isinstance(value, list)
        seen.append(value)
        labels.append(searcher_values({"peft.lora.target_modules": value}, dims))
        try:
            study.tell(trial, float(i))
        except RuntimeError as err:  # the grid is done: Optuna asks the study to stop
            assert "stop" in str(err) and i == 2
    if search == "grid":  # each point once
        assert sorted(map(tuple, seen)) == sorted(map(tuple, targets))
    else:
        assert {tuple(v) for v in seen} == {tuple(v) for v in targets}
    # The searcher values (what a warm start replays) are Optuna's labels, and a study
    # rebuilt from them holds every trial.
    assert all(isinstance(v["peft.lora.target_modules"], str) for v in labels)
    rebuilt = study_of(dims, "max", [(v, float(i)) for i, v in enumerate(labels)])
    assert len(rebuilt.trials) == len(labels)


def test_the_configs_own_point_is_the_first_trial_in_searcher_names(tmp_path):
    raw = _raw(tmp_path, BRANCHED)
    raw["train"]["weight_decay"] = 0.0
    cfg = validate_experiment(raw, check_files=False)
    point = first_point(cfg, dimensions(cfg))
    # smoke_config: lora r 4, alpha 8 (ratio 2), lr 1e-3, weight_decay 0.0 (set below)
    assert point == {
        "peft.method": "lora",
        "train.lr[peft.method=lora]": 1e-3,
        "peft.lora.r": 4,
        "peft.lora.lora_alpha[ratio]": 2,
        "train.weight_decay": 0.0,
    }
    outside = _cfg(tmp_path, {"train.lr": {"type": "loguniform", "low": 1e-2, "high": 1e-1}})
    assert first_point(outside, dimensions(outside)) == {}


REFUSALS = [
    ({"train.no_such": {"type": "uniform", "low": 0, "high": 1}}, {}, "no_such"),
    ({"data.clean.lowercase": {"type": "choice", "values": [True]}}, {}, "cannot be searched"),
    (
        {"data.max_length": {"type": "int", "low": 16, "high": 64}},
        {},
        "64 is above data.max_length",
    ),
    ({"train.lr": {"type": "uniform", "low": -1.0, "high": 0.1}}, {}, "-1.0 is outside"),
    ({"peft.lora.r": {"type": "int", "low": 1, "high": 1024}}, {}, "1024 is outside"),
    ({}, {}, "tune.space is empty"),
    ({"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, {"num_samples": 0}, "num_samples"),
    (
        {"train.lr": {"type": "grid", "values": [1e-3, 2e-3, 3e-3]}},
        {"search": "grid", "num_samples": 2},
        "grid of 3 points but tune.num_samples is 2",
    ),
    ({"train.lr": {"type": "grid", "values": [1e-3]}}, {}, "needs tune.search: grid"),
    (
        {"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}},
        {"metric": "val_bleu"},
        "val_bleu",
    ),
    (
        {"train.lr": {"type": "uniform", "low": 0.1, "high": 0.2}},
        {"metric": "val_loss", "mode": "max"},
        "contradicts",
    ),
    (
        {"peft.lora.r": {"type": "int", "low": 2, "high": 8, "when": {"peft.method": "lora"}}},
        {},
        "not searched",
    ),
    (
        {
            "peft.method": {"type": "choice", "values": ["lora", "none"]},
            "peft.lora.r": {"type": "int", "low": 2, "high": 8, "when": {"peft.method": "dora"}},
        },
        {},
        "'dora', which is not one of its values",
    ),
    (
        {
            "peft.method": {"type": "choice", "values": ["lora", "none"]},
            "train.lr": [
                {"type": "uniform", "low": 0.1, "high": 0.2, "when": {"peft.method": "lora"}},
                {
                    "type": "uniform",
                    "low": 0.2,
                    "high": 0.3,
                    "when": {"peft.method": ["lora", "none"]},
                },
            ],
        },
        {},
        "can both apply",
    ),
    ({"peft.lora.lora_alpha": {"ratio_of": "peft.lora.nope", "values": [2]}}, {}, "nope"),
    ({"peft.method": {"type": "choice", "values": ["lora"]}}, {"search": "cmaes"}, "cmaes needs"),
    ({"train.lr": {"type": "int", "low": 1, "high": 9, "log": True, "step": 2}}, {}, "'log'"),
]


@pytest.mark.parametrize(("space", "tune", "message"), REFUSALS)
def test_validate_refuses_a_bad_space_in_one_line(tmp_path, space, tune, message):
    config = write_yaml(tmp_path / "bad.yaml", _raw(tmp_path, space, **tune))
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code != 0, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    with pytest.raises(ConfigError):
        validate_experiment(_raw(tmp_path, space, **tune), check_files=False)


def test_a_space_turns_tune_on_unless_told_otherwise(tmp_path):
    raw = _raw(tmp_path, BRANCHED)
    del raw["tune"]["enabled"]
    assert validate_experiment(raw, check_files=False).tune.enabled
    raw["tune"] = {}
    assert not validate_experiment(raw, check_files=False).tune.enabled


def test_branches_are_ordered_before_what_depends_on_them():
    cfg_space = {
        "peft.lora.lora_alpha": BRANCHED["peft.lora.lora_alpha"],
        "peft.lora.r": BRANCHED["peft.lora.r"],
        "peft.method": BRANCHED["peft.method"],
    }
    from lepton_ray.config.tune import TuneSection

    names = [d.name for d in compile_space(TuneSection(space=cfg_space).space)]
    assert names == ["peft.method", "peft.lora.r", "peft.lora.lora_alpha[ratio]"]


def test_the_best_config_yaml_is_a_config_train_accepts(tmp_path):
    cfg = _cfg(tmp_path)
    text = best_config_yaml(cfg, {"peft.method": "none", "train.lr": 3e-5}, "best trial x")
    assert text.startswith("# best trial x\n")
    raw = yaml.safe_load(text)
    assert raw["tune"]["enabled"] is False and raw["train"]["lr"] == 3e-5
    config = tmp_path / "best.yaml"
    config.write_text(text)
    result = runner.invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output


def test_optuna_plots_come_from_the_finished_trials(tmp_path):
    cfg = _cfg(tmp_path)
    dims = dimensions(cfg)
    points = [
        (
            {"peft.method": "none", "train.lr[peft.method=none]": 3e-5, "train.weight_decay": 0.0},
            0.6,
        ),
        (
            {"peft.method": "none", "train.lr[peft.method=none]": 5e-5, "train.weight_decay": 0.05},
            0.65,
        ),
        (
            {
                "peft.method": "lora",
                "train.lr[peft.method=lora]": 1e-3,
                "peft.lora.r": 8,
                "peft.lora.lora_alpha[ratio]": 2,
                "train.weight_decay": 0.1,
            },
            0.8,
        ),
        ({"train.lr[peft.method=lora]": 5.0}, 0.1),  # outside the space: left out
    ]
    assert len(study_of(dims, "max", points).trials) == 3
    figures = optuna_figures(dims, "max", points)
    assert {"plots/optuna_history.png", "plots/optuna_parallel_coordinates.png"} <= set(figures)


def test_the_trial_table_prints_a_line_per_change_in_a_log(tmp_path):
    lines: list[str] = []
    table = TrialTable(_cfg(tmp_path), lines.append, terminal=False)
    table.update(
        "a_00000",
        "RUNNING",
        {"train.lr": 1e-3, "train.lr[x]": 1},
        {"epoch": 1.0, "val_accuracy": 0.75},
    )
    table.update("a_00000", "DONE", {"train.lr": 1e-3}, None)
    assert len(lines) == 2
    assert "a_00000 RUNNING" in lines[0] and "epoch 1 rung 1" in lines[0]
    assert "val_accuracy 0.7500" in lines[0] and "train.lr=0.001" in lines[0]
    assert "[x]" not in lines[0]
    assert "DONE" in lines[1] and "0.7500" in lines[1]  # the latest metric stays


class _Unpicklable:
    """A log like a notebook's print: callable, but it cannot be pickled."""

    def __call__(self, line: str) -> None:
        pass

    def __reduce__(self):
        raise TypeError("cannot pickle this log")


def test_the_table_callback_survives_tunes_pickling_with_any_log(tmp_path):
    """Tune pickles its callbacks into the sweep's state (and Tuner.restore unpickles them):
    a picklable log travels, one that cannot is replaced by print, never an error."""
    import builtins

    from ray import cloudpickle

    from lepton_ray.tune.report import table_callback

    lines: list[str] = []
    kept = cloudpickle.loads(cloudpickle.dumps(table_callback(_cfg(tmp_path), lines.append)))
    assert kept.table.cfg.tune.metric == _cfg(tmp_path).tune.metric
    replaced = cloudpickle.loads(cloudpickle.dumps(table_callback(_cfg(tmp_path), _Unpicklable())))
    assert replaced.table.log is builtins.print


TECHNIQUES = {
    "peft.method": {"type": "choice", "values": ["lora", "adalora", "ia3", "none"]},
    "peft.lora.r": {"type": "int", "low": 2, "high": 8, "when": {"peft.method": "lora"}},
    "peft.lora.use_dora": {
        "type": "choice",
        "values": [True, False],
        "when": {"peft.method": "lora"},
    },
    "peft.adalora.init_r": {
        "type": "choice",
        "values": [8, 12],
        "when": {"peft.method": "adalora"},
    },
    "peft.adalora.target_r": {
        "type": "choice",
        "values": [2, 4],
        "when": {"peft.method": "adalora"},
    },
    "train.label_smoothing": {"type": "uniform", "low": 0.0, "high": 0.2},
}


def test_a_sweep_over_peft_methods_gives_each_trial_its_methods_adapter(tmp_path):
    """``peft.method`` as a choice, each method with parameters of its own: validate accepts
    the space, and every sampled trial's config builds exactly that method's adapter, with
    the sampled values in it."""
    from lepton_ray.artifacts import build_model
    from lepton_ray.config import apply_overrides
    from lepton_ray.train.peft import apply_peft
    from lepton_ray.train.peft_methods import adalora_ranks

    raw = _raw(tmp_path, TECHNIQUES, search="random", seed=3)
    result = runner.invoke(app, ["validate", str(write_yaml(tmp_path / "sweep.yaml", raw))])
    assert result.exit_code == 0, result.output
    cfg = validate_experiment(raw, check_files=False)
    seen = set()
    for values in _sampled(cfg, 16):
        method = values["peft.method"]
        seen.add(method)
        trial_cfg = apply_overrides(cfg, values)
        assert trial_cfg.train.label_smoothing == values["train.label_smoothing"]
        model = build_model(trial_cfg.model, trial_cfg.task, ["negative", "positive"])
        model = apply_peft(model, trial_cfg.peft, trial_cfg.task, total_steps=20)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        adapters = {
            part for n in trainable for part in n.split(".") if part.startswith(("lora_", "ia3_"))
        }
        if method == "lora":
            assert trial_cfg.peft.lora.r == values["peft.lora.r"]
            expected = {"lora_A", "lora_B"} | (
                {"lora_magnitude_vector"} if values["peft.lora.use_dora"] else set()
            )
            assert adapters == expected, adapters
            assert all(
                p.shape[0] == values["peft.lora.r"]
                for n, p in model.named_parameters()
                if ".lora_A." in n
            )
        elif method == "adalora":
            assert adapters == {"lora_A", "lora_B", "lora_E"}, adapters
            ranks = adalora_ranks(model)
            assert ranks and set(ranks.values()) == {values["peft.adalora.init_r"]}
            assert trial_cfg.peft.adalora.target_r == values["peft.adalora.target_r"]
        elif method == "ia3":
            assert adapters == {"ia3_l"}, adapters
        else:
            assert all(p.requires_grad for p in model.parameters())
            assert set(values) == {"peft.method", "train.label_smoothing"}
    assert seen == {"lora", "adalora", "ia3", "none"}
