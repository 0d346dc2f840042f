"""Sweeps search loss types and their parameters like any other field."""

from __future__ import annotations

import optuna
import pytest

from dpolab.cli import main
from dpolab.config import TrainConfig
from dpolab.runs import SweepFolder
from dpolab.sweep import SweepConfig
from dpolab.sweep.runner import suggest

from .conftest import tiny_base, write_sweep_yaml


@pytest.mark.slow
def test_grid_over_two_loss_types_from_the_command_line(tmp_path, monkeypatch):
    """`dpolab sweep` over loss_type [ipo, simpo] with --beta setting the base: the reference pass runs
    for ipo only (SimPO reads none), each trial trains with its own loss."""
    monkeypatch.chdir(tmp_path)
    write_sweep_yaml(tmp_path / "sweep.yaml", base=tiny_base(tmp_path / "cache"), trials=[],
                     grid={"loss_type": ["ipo", "simpo"]})
    assert main(["sweep", "--config", "sweep.yaml", "--output-dir", "sweep", "--beta", "0.2"]) == 0
    sweep = SweepFolder.open(tmp_path / "sweep")
    trials = {run.config()["loss_type"]: run for run in sweep.trials()}
    assert set(trials) == {"ipo", "simpo"}
    assert {run.config()["beta"] for run in trials.values()} == {0.2}  # the command line's base
    assert trials["simpo"].summary()["reference_free"] is True
    assert trials["simpo"].summary()["reference_cache"] == "none"
    assert trials["ipo"].summary()["reference_cache"] == "hit"  # filled once, before the trials
    assert len(sweep.info()["reference"]) == 1
    assert {run.summary()["eval"]["loss"] for run in trials.values()} != {None}


def test_search_space_suggests_loss_types_and_their_parameters():
    """Optuna's categorical choices must be plain values: a loss mix is its one-string form."""
    config = SweepConfig(mode="search", n_trials=2, search_space={
        "loss_type": {"choices": ["sigmoid", "simpo", "sigmoid,sft"]}, "rdpo_alpha": {"low": 0.0, "high": 0.05},
        "ld_alpha": {"low": 0.2, "high": 1.0}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = {key: suggest(trial, key, spec) for key, spec in config.search_space.items()}
        if "sigmoid" not in values["loss_type"]:
            values["rdpo_alpha"] = 0.0  # R-DPO's term belongs to the sigmoid loss
        train = TrainConfig.from_dict(config.train_values(values), source="sweep")
        assert 0.2 <= train.ld_alpha <= 1.0
        seen.add(train.loss_type)
        study.tell(trial, 0.0)
    assert seen == {"sigmoid", "simpo", "sigmoid,sft"}
