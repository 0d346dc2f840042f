"""A 3-trial grid finishes, the reference pass runs once, best.json is the
lowest eval loss; a failing trial is recorded as failed and the others finish."""

from __future__ import annotations

import logging
import math

import optuna
import pytest
from optuna.trial import TrialState

from dpolab.errors import ConfigError
from dpolab.runs import RunFolder, SweepFolder, read_json, resolve_model_dir
from dpolab.sweep import SweepConfig, load_sweep_config, run_sweep
from dpolab.sweep.study import NAME_ATTR, default_storage_url

from .conftest import tiny_base, write_sweep_yaml


def load_study(sweep: SweepFolder) -> optuna.Study:
    return optuna.load_study(study_name=sweep.info()["study_name"], storage=default_storage_url(sweep.path))


@pytest.mark.slow
def test_grid_three_trials_reference_once_best_recorded(tmp_path, caplog):
    config = SweepConfig(base=tiny_base(tmp_path / "cache"), trials=[
        {"name": "lr1e-4", "learning_rate": 1e-4},
        {"name": "lr3e-3", "learning_rate": 3e-3, "weight_decay": 0.01},
        {"name": "lr1e-2", "learning_rate": 1e-2, "beta": 0.2, "max_steps": 3},  # eval_steps 2: evals at 2 and 3
    ])
    with caplog.at_level(logging.INFO):
        sweep = run_sweep(config, tmp_path / "sweep")

    study = load_study(sweep)
    assert sorted(t.user_attrs[NAME_ATTR] for t in study.trials if t.state == TrialState.COMPLETE) == \
        ["lr1e-2", "lr1e-4", "lr3e-3"]
    assert len(study.trials) == 3

    # The reference pass ran once for the sweep: one miss in the sweep's records, only hits in trials.
    trials = {run.path.name: run for run in sweep.trials()}
    assert set(trials) == {"lr1e-4", "lr3e-3", "lr1e-2"}
    summaries = {name: run.summary() for name, run in trials.items()}
    reference = sweep.info()["reference"]
    statuses = [r["reference_cache"] for r in reference] + [s["reference_cache"] for s in summaries.values()]
    assert statuses.count("miss") == 1 and reference[0]["reference_cache"] == "miss"
    assert {s["reference_key"] for s in summaries.values()} == {reference[0]["reference_key"]}
    assert sum("reference log-probs: computing once" in r.getMessage() for r in caplog.records) == 1

    # Each trial trained with its own config (beta really changes: Trainer.hyperparameter_search could not).
    assert RunFolder(trials["lr1e-2"].path).config()["beta"] == 0.2
    assert trials["lr3e-3"].config()["learning_rate"] == 3e-3

    # The last step's eval happened inside training (EvaluateAtEnd), once.
    assert [r["step"] for r in trials["lr1e-2"].metrics("eval")] == [2, 3]
    assert summaries["lr1e-2"]["eval"]["step"] == 3

    losses = {name: s["eval"]["loss"] for name, s in summaries.items()}
    best = sweep.best()
    assert best["trial"] == min(losses, key=losses.get)
    assert math.isclose(best["value"], losses[best["trial"]])
    assert best["run_dir"] == f"trials/{best['trial']}" and best["model_dir"] == f"trials/{best['trial']}/model"
    assert resolve_model_dir(sweep.path) == sweep.path / best["model_dir"]
    assert (sweep.path / best["model_dir"] / "config.json").is_file()

    # Re-running the finished sweep trains nothing and keeps every record.
    mtimes = {name: run.summary_path.stat().st_mtime_ns for name, run in trials.items()}
    run_sweep(config, tmp_path / "sweep")
    assert len(load_study(sweep).trials) == 3
    assert {name: run.summary_path.stat().st_mtime_ns for name, run in trials.items()} == mtimes

    # The report of this sweep: one table row per trial, best marked.
    from dpolab.report import write_report

    report = write_report(sweep.path)
    table = (report.parent / "table.md").read_text()
    assert table.count("| lr") == 3 and f"★ {best['trial']}" in table


@pytest.mark.slow
def test_sweeping_what_changes_the_reference_pass_prepares_each_setup_ahead(tmp_path):
    """The sweep keys its shared caches with the data cache key and the reference's precision, so a
    sweep over precision or prompt format scores each reference once, before the trials."""
    config = SweepConfig(base=tiny_base(tmp_path / "cache"), trials=[
        {"name": "fp32-hh", "dtype": "fp32", "chat_template": "hh"},
        {"name": "bf16-hh", "dtype": "bf16", "chat_template": "hh"},
        {"name": "fp32-auto", "dtype": "fp32", "chat_template": "auto"},  # the same data key as fp32-hh
    ])
    sweep = run_sweep(config, tmp_path / "sweep")
    prepared = sweep.info()["reference"]
    assert len(prepared) == 2 and [r["reference_cache"] for r in prepared] == ["miss", "miss"]
    summaries = {run.path.name: run.summary() for run in sweep.trials()}
    assert {name: s["reference_cache"] for name, s in summaries.items()} == {
        "fp32-hh": "hit", "bf16-hh": "hit", "fp32-auto": "hit"}
    assert {name: s["dtype"] for name, s in summaries.items()} == {
        "fp32-hh": "fp32", "bf16-hh": "bf16", "fp32-auto": "fp32"}


@pytest.mark.slow
def test_failing_trials_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import dpolab.stages as stages

    real_train = stages.train

    def train(config, output_dir, resume=False, callbacks=None):
        if output_dir.name == "diverges":  # stands in for a run whose loss went NaN
            run = RunFolder.create(output_dir, {"engine": "dpolab"})
            run.write_summary({"eval": {"loss": float("nan")}})
            return run
        return real_train(config, output_dir, resume=resume, callbacks=callbacks)

    monkeypatch.setattr(stages, "train", train)
    config = SweepConfig(base=tiny_base(tmp_path / "cache"), trials=[
        {"name": "bad-beta", "beta": -1.0},
        {"name": "diverges"},
        {"name": "good", "learning_rate": 1e-3},
    ])
    sweep = run_sweep(config, tmp_path / "sweep")

    study = load_study(sweep)
    states = {t.user_attrs[NAME_ATTR]: t for t in study.trials}
    assert states["bad-beta"].state == TrialState.FAIL
    assert "beta must be > 0" in states["bad-beta"].user_attrs["error"]
    assert states["diverges"].state == TrialState.FAIL
    assert "diverged" in states["diverges"].user_attrs["error"]
    assert states["good"].state == TrialState.COMPLETE
    assert read_json(sweep.trial_dir("bad-beta") / "trial.json")["state"] == "fail"
    assert sweep.best()["trial"] == "good"


def test_sweep_config_validation_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown TrainConfig key 'lerning_rate'"):
        SweepConfig(trials=[{"lerning_rate": 1e-3}])
    with pytest.raises(ConfigError, match="names must be unique"):
        SweepConfig(trials=[{"name": "a"}, {"name": "a"}])
    # Default: the 3-row table of learning rate, batch size and weight decay.
    default = SweepConfig()
    assert [(p["learning_rate"], p["per_device_train_batch_size"], p["weight_decay"], p["num_train_epochs"])
            for p in default.grid_points()] == [(5e-5, 3, 0.01, 2), (1e-4, 3, 0.01, 2), (5e-5, 4, 0.005, 2)]
    # A cartesian product crossed with listed trials.
    config = load_sweep_config(write_sweep_yaml(
        tmp_path / "s.yaml", trials=[{"name": "x", "beta": 0.1}], grid={"learning_rate": [1e-4, 1e-3], "seed": [1, 2]}))
    points = config.grid_points()
    assert len(points) == 4 and {p["name"] for p in points} == {"x-000", "x-001", "x-002", "x-003"}
    assert {(p["learning_rate"], p["seed"]) for p in points} == {(1e-4, 1), (1e-4, 2), (1e-3, 1), (1e-3, 2)}
    with pytest.raises(ConfigError, match="unknown sweep key"):
        load_sweep_config(write_sweep_yaml(tmp_path / "bad.yaml", trails=[]))
    for name in ("demo", "hh", "search"):
        assert load_sweep_config(f"configs/sweep-{name}.yaml").mode in ("grid", "search")


@pytest.mark.slow
def test_sweep_selects_by_length_balanced_accuracy(tmp_path):
    """`objective: eval/rewards/accuracies_length_balanced` (maximize) from the sweep YAML: every trial
    records it, and best.json names the trial with the highest."""
    path = write_sweep_yaml(tmp_path / "sweep.yaml", base=tiny_base(tmp_path / "cache", max_eval_pairs=32),
                            objective="eval/rewards/accuracies_length_balanced", direction="maximize",
                            trials=[{"name": "lr1e-4", "learning_rate": 1e-4}, {"name": "lr1e-2", "learning_rate": 1e-2}])
    sweep = run_sweep(load_sweep_config(path), tmp_path / "sweep")
    values = {run.path.name: run.summary()["eval"]["rewards/accuracies_length_balanced"] for run in sweep.trials()}
    assert set(values) == {"lr1e-4", "lr1e-2"}
    best = sweep.best()
    assert best["objective"] == "eval/rewards/accuracies_length_balanced"
    assert best["value"] == max(values.values()) and values[best["trial"]] == best["value"]
