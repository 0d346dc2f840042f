"""A trial that kills its worker on every attempt is queued again at most ``max_retry`` times,
then recorded as failed with the reason; the sweep finishes the other trials and later reruns
do not start it again."""

from __future__ import annotations

import signal
import subprocess
import sys

import optuna
from optuna.trial import TrialState

from dpolab.runs import SweepFolder
from dpolab.sweep.study import NAME_ATTR, default_storage_url

from .conftest import subprocess_env, tiny_base, write_sweep_yaml

# A real `dpolab sweep` worker whose trial "doomed" SIGKILLs its own process (as the kernel's OOM
# killer would) on every attempt; the other trial stands in for training with a summary (fast).
WORKER = """
import os, signal, sys
import dpolab.stages as stages
import dpolab.sweep.runner as runner
from dpolab.cli import main
from dpolab.runs import RunFolder

def train(config, output_dir, resume=False, callbacks=None):
    if output_dir.name == "doomed":
        os.kill(os.getpid(), signal.SIGKILL)
    run = RunFolder.create(output_dir, {"engine": "fake"})
    run.write_summary({"eval": {"loss": 0.5}})
    return run

stages.train = train
runner.fill_caches = lambda config: []
sys.exit(main(sys.argv[1:]))
"""


def test_a_trial_that_kills_its_worker_every_time_is_given_up_after_max_retry(tmp_path):
    config_path = write_sweep_yaml(tmp_path / "sweep.yaml", base=tiny_base(tmp_path / "cache"),
                                   trials=[{"name": "doomed"}, {"name": "fine"}], max_retry=1)
    sweep_dir = tmp_path / "sweep"

    def rerun() -> int:
        return subprocess.run([sys.executable, "-c", WORKER, "sweep", "--config", str(config_path),
                               "--output-dir", str(sweep_dir)], env=subprocess_env(), timeout=300,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode

    # First attempt, then its one retry: each kills the worker.
    assert [rerun(), rerun()] == [-signal.SIGKILL, -signal.SIGKILL]
    assert rerun() == 0  # max_retry reached: recorded as failed, the sweep ends
    assert rerun() == 0  # and stays so

    study = optuna.load_study(study_name="sweep", storage=default_storage_url(sweep_dir))
    doomed = [t for t in study.get_trials() if t.user_attrs[NAME_ATTR] == "doomed"]
    assert [t.state for t in doomed] == [TrialState.FAIL, TrialState.FAIL]  # no third attempt
    assert "died while running it" in doomed[-1].user_attrs["error"]
    assert "max_retry 1: not retried" in doomed[-1].user_attrs["error"]
    sweep = SweepFolder.open(sweep_dir)
    record = sweep.trial_record("doomed")
    assert record["state"] == "fail" and "died while running it" in record["error"]
    assert sweep.trial_record("fine")["state"] == "complete"
    assert sweep.best()["trial"] == "fine"
