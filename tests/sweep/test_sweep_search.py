"""Search mode: TPE suggestions inside the ranges reach each trial's config, the trial budget holds,
and the median pruner stops a trial from its intermediate eval loss. Training is replaced by a fast
stand-in that reports a scripted eval-loss curve through the pruning callback."""

from __future__ import annotations

import statistics

import optuna
import pytest
from optuna.trial import TrialState

from dpolab.runs import RunFolder
from dpolab.sweep import SweepConfig, run_sweep
from dpolab.sweep.runner import PruningCallback, objective_value
from dpolab.sweep.study import NAME_ATTR, OVERRIDES_ATTR, default_storage_url

from .conftest import tiny_base


def fake_train(seen: list):
    """A train() whose eval loss is 1/lr-shaped: worse learning rates give worse curves."""

    def train(config, output_dir, resume=False, callbacks=None):
        seen.append(config)
        run = RunFolder.create(output_dir, {"engine": "fake"})
        losses = [0.69 - step * config.learning_rate * 20 for step in (1, 2, 3)]
        for step, loss in enumerate(losses, start=1):
            for callback in callbacks or []:
                callback.on_evaluate(None, type("State", (), {"global_step": step})(), None,
                                     metrics={"eval_loss": loss})
        run.write_summary({"eval": {"loss": losses[-1]}, "wall_time_s": 1.0})
        return run

    return train


def test_search_budget_ranges_and_pruning(tmp_path, monkeypatch):
    import dpolab.stages as stages
    import dpolab.sweep.runner as runner

    seen: list = []
    monkeypatch.setattr(stages, "train", fake_train(seen))
    monkeypatch.setattr(runner, "fill_caches", lambda config: [])  # no real data/reference pass here
    space = {"learning_rate": {"low": 1e-4, "high": 1e-3, "log": True}, "beta": {"low": 0.05, "high": 0.5},
             "weight_decay": {"low": 0.0, "high": 0.05}, "per_device_train_batch_size": {"choices": [2, 4]}}
    config = SweepConfig(mode="search", base=tiny_base(tmp_path / "cache"), search_space=space, n_trials=6,
                         pruner_startup_trials=2, sampler_seed=3)
    assert config.use_pruning
    sweep = run_sweep(config, tmp_path / "sweep")

    study = optuna.load_study(study_name="sweep", storage=default_storage_url(sweep.path))
    assert len(study.trials) == 6 and len(seen) == 6
    for train_config, trial in zip(seen, study.trials, strict=True):
        overrides = trial.user_attrs[OVERRIDES_ATTR]
        assert 1e-4 <= train_config.learning_rate <= 1e-3 and 0.05 <= train_config.beta <= 0.5
        assert train_config.per_device_train_batch_size in (2, 4) and 0 <= train_config.weight_decay <= 0.05
        assert train_config.beta == overrides["beta"] == trial.params["beta"]  # beta really varies per trial
    assert len({c.beta for c in seen}) == 6
    states = [t.state for t in study.trials]
    assert states[:2] == [TrialState.COMPLETE, TrialState.COMPLETE]  # startup trials are never pruned
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned, "the median pruner stopped no trial"
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for trial in pruned:
        # Stopped at its first evaluation whose loss was worse than the median loss, at that step,
        # of the trials completed before it (one worker: lower numbers finished first).
        step, loss = max(trial.intermediate_values.items())
        assert step < 3  # before its last evaluation
        earlier = sorted(t.intermediate_values[step] for t in complete if t.number < trial.number)
        assert loss > statistics.median(earlier)
        assert sweep.trial_record(trial.user_attrs[NAME_ATTR])["state"] == "pruned"
    best = min(complete, key=lambda t: t.value)
    assert sweep.best()["trial"] == best.user_attrs[NAME_ATTR] == f"trial-{best.number:03d}"

    # Re-running a finished search spends no more budget.
    run_sweep(config, tmp_path / "sweep")
    assert len(seen) == 6


def test_pruning_callback_raises_when_the_pruner_says_so():
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.6))
    trial = study.ask()
    callback = PruningCallback(trial, "eval_loss")
    state = type("State", (), {"global_step": 5})()
    callback.on_evaluate(None, state, None, metrics={"eval_loss": 0.55})
    state.global_step = 6
    with pytest.raises(optuna.TrialPruned, match="step 6"):
        callback.on_evaluate(None, state, None, metrics={"eval_loss": 0.65})
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {5: 0.55, 6: 0.65}


def test_objective_lookup():
    summary = {"eval": {"loss": 0.6, "rewards/accuracies": 0.7}, "pairs_per_s": 11.0}
    assert objective_value(summary, "eval/loss") == 0.6
    assert objective_value(summary, "eval/rewards/accuracies") == 0.7
    assert objective_value(summary, "pairs_per_s") == 11.0
    with pytest.raises(KeyError):
        objective_value(summary, "eval/nope")


def test_sweep_groups_its_trials_in_the_trackers(tmp_path, monkeypatch):
    import os

    import dpolab.stages as stages
    import dpolab.sweep.runner as runner

    for key in ("WANDB_RUN_GROUP", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    seen_env = []

    def train(config, output_dir, resume=False, callbacks=None):
        seen_env.append({k: os.environ.get(k) for k in ("WANDB_RUN_GROUP", "MLFLOW_EXPERIMENT_NAME",
                                                         "MLFLOW_TRACKING_URI")} | {"report_to": config.report_to})
        run = RunFolder.create(output_dir, {"engine": "fake"})
        run.write_summary({"eval": {"loss": 0.5}})
        return run

    monkeypatch.setattr(stages, "train", train)
    monkeypatch.setattr(runner, "fill_caches", lambda config: [])
    config = SweepConfig(name="lr-study", base=tiny_base(tmp_path / "cache"), trials=[{"name": "x"}, {"name": "y"}])
    run_sweep(config, tmp_path / "sweep", report_to=["wandb", "mlflow"])
    assert len(seen_env) == 2
    for env in seen_env:
        assert env["WANDB_RUN_GROUP"] == env["MLFLOW_EXPERIMENT_NAME"] == "lr-study"
        assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{(tmp_path / 'sweep').resolve() / 'mlflow.db'}"
        assert env["report_to"] == ["wandb", "mlflow"]
    assert "WANDB_RUN_GROUP" not in os.environ  # scoped to the sweep
