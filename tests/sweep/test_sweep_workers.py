"""A sweep killed mid-trial resumes with every configuration done exactly once;
two worker processes share one study on a real PostgreSQL server without running a trial twice."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from dpolab.runs import SweepFolder
from dpolab.sweep import load_sweep_config, prepare_sweep
from dpolab.sweep.study import NAME_ATTR, WORKER_ATTR, default_storage_url

from .conftest import dpolab_command, subprocess_env, tiny_base, write_sweep_yaml

GRID = [{"name": "a", "learning_rate": 1e-3}, {"name": "b", "learning_rate": 3e-3}, {"name": "c", "learning_rate": 1e-2}]


def train_steps(sweep: SweepFolder, name: str) -> list[int]:
    from dpolab.runs import RunFolder

    return [row["step"] for row in RunFolder(sweep.trial_dir(name)).metrics("train")]


@pytest.mark.slow
def test_killed_sweep_resumes_every_configuration_exactly_once(tmp_path):
    # Trial b saves a checkpoint every 2 steps and runs 8: long enough to be killed mid-way.
    grid = [dict(GRID[0]), {**GRID[1], "max_steps": 8, "save_steps": 2, "eval_steps": 4}, dict(GRID[2])]
    config_path = write_sweep_yaml(tmp_path / "sweep.yaml", base=tiny_base(tmp_path / "cache"), trials=grid)
    sweep_dir = tmp_path / "sweep"
    command = dpolab_command("sweep", "--config", str(config_path), "--output-dir", str(sweep_dir))
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(),
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        # Kill once trial b has logged a step past its first checkpoint: it is mid-training.
        while time.monotonic() < deadline and first.poll() is None:
            if (sweep_dir / "trials" / "b" / "checkpoints" / "checkpoint-2").is_dir() and \
                    len(train_steps(SweepFolder(sweep_dir), "b")) >= 3:
                break
            time.sleep(0.2)
        assert first.poll() is None, "the sweep finished or crashed before it could be killed:\n" + \
            (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()

    sweep = SweepFolder.open(sweep_dir)
    a_summary_mtime = (sweep.trial_dir("a") / "summary.json").stat().st_mtime_ns
    assert not (sweep.trial_dir("b") / "summary.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    study = optuna.load_study(study_name="sweep", storage=default_storage_url(sweep_dir))
    complete = Counter(t.user_attrs[NAME_ATTR] for t in study.trials if t.state == TrialState.COMPLETE)
    assert complete == {"a": 1, "b": 1, "c": 1}
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.user_attrs[NAME_ATTR] for t in failed] == ["b"]
    assert "died" in failed[0].user_attrs["error"]
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # a was not trained again; b continued from its checkpoint, each step recorded once.
    assert (sweep.trial_dir("a") / "summary.json").stat().st_mtime_ns == a_summary_mtime
    assert train_steps(sweep, "b") == list(range(1, 9))
    assert {run.path.name for run in sweep.trials()} == {"a", "b", "c"}
    assert sweep.best()["trial"] in {"a", "b", "c"}


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(tmp_path, postgres_url):
    grid = GRID + [{"name": "d", "learning_rate": 2e-3, "beta": 0.2}]
    config_path = write_sweep_yaml(tmp_path / "sweep.yaml", base=tiny_base(tmp_path / "cache"), trials=grid)
    sweep_dir = tmp_path / "sweep"
    # Create the study once (queue the grid, fill the caches), then start two workers on it.
    prepare_sweep(load_sweep_config(config_path), sweep_dir, storage=postgres_url)
    command = dpolab_command("sweep", "--config", str(config_path), "--output-dir", str(sweep_dir),
                             "--storage", postgres_url)
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=subprocess_env())
               for _ in range(2)]
    outputs = [w.communicate(timeout=400)[0].decode(errors="replace") for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name="sweep", storage=postgres_url)
    names = [t.user_attrs[NAME_ATTR] for t in study.trials]
    assert sorted(names) == ["a", "b", "c", "d"], "a trial ran twice or was lost"
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    pids = {t.user_attrs[WORKER_ATTR]["pid"] for t in study.trials}
    assert pids <= {w.pid for w in workers}
    sweep = SweepFolder.open(sweep_dir)
    for name in names:  # each trial folder holds exactly one run: every step logged once
        assert train_steps(sweep, name) == [1, 2]
    assert sweep.info()["storage"].startswith("postgresql")
    assert sweep.best()["trial"] in names
