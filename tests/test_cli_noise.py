"""What a user reads on the terminal: a training run, its resume and ``--help`` print no false
alarms and nothing twice, and a finished run says what to do next. Real processes, stderr as the
user sees it (warnings and library loggers included)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from dpolab.cli import main

ARGS = ["train", "--max-steps", "2", "--save-steps", "1", "--max-train-pairs", "8", "--max-eval-pairs", "4",
        "--max-length", "64", "--max-prompt-length", "32", "--dtype", "fp32"]


def dpolab(*argv: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONWARNINGS", None)  # the user's default: FutureWarnings are shown
    return subprocess.run([sys.executable, "-m", "dpolab.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained from an empty data cache, then resumed from its first checkpoint (as after a
    kill between the two checkpoints): both processes' outputs."""
    work = tmp_path_factory.mktemp("noise")
    first = dpolab(*ARGS, "--cache-dir", "cache", "--output-dir", "run", cwd=work)
    assert first.returncode == 0, first.stderr[-3000:]
    run = work / "run"
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "checkpoint-2")
    resumed = dpolab(*ARGS, "--cache-dir", "cache", "--output-dir", "run", "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    return work, first, resumed


def test_training_prints_no_deprecation_warnings(trained):
    _, first, resumed = trained
    for proc in (first, resumed):
        assert "FutureWarning" not in proc.stderr, proc.stderr
        assert "checkpointing" not in proc.stderr, proc.stderr


def test_the_data_summary_is_printed_once_on_a_cache_miss(trained):
    _, first, resumed = trained
    assert "data: cache hit" not in first.stderr  # the first run built the cache
    assert first.stderr.count("data: read 2312 rows") == 1, first.stderr
    assert resumed.stderr.count("data: read 2312 rows") == 1, resumed.stderr


def test_resume_does_not_report_the_tied_lm_head_as_missing(trained):
    _, _, resumed = trained
    assert "missing keys" not in resumed.stderr, resumed.stderr
    assert "lm_head" not in resumed.stderr


def test_train_says_what_to_do_next(trained):
    work, first, _ = trained
    assert f"next: dpolab evaluate {work / 'run'}" in first.stdout
    assert f"dpolab serve {work / 'run'}" in first.stdout


def test_evaluate_help_shows_a_plain_percent_sign(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    assert "95% intervals" in out and "%%" not in out
