"""Crash safety: SIGKILL training (after a checkpoint, or during the final model save), resume,
and end exactly where an uninterrupted run ends (CPU training is deterministic)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from dpolab.cli import main

# logging_steps 5 and save_steps 3 do not line up: train rows must still cover every step once.
# dtype fp32: `auto` times a matmul probe in each process, and on a busy machine with bf16
# instructions two processes could choose differently (seen once in 9 runs beside two busy loops).
ARGS = ["train", "--config", "configs/tiny.yaml", "--max-train-pairs", "96", "--max-eval-pairs", "16",
        "--per-device-train-batch-size", "4", "--max-steps", "24", "--save-steps", "3", "--logging-steps", "5",
        "--eval-steps", "12", "--seed", "3", "--lr-scheduler-type", "constant", "--dtype", "fp32"]


def subprocess_env() -> dict[str, str]:
    """Read when a test runs, after conftest's session fixture pointed DPOLAB_CACHE at the test cache:
    captured at import, the killed run would score its reference into (and read stale entries from)
    the user's own cache."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}

# Runs `dpolab` and SIGKILLs it right after the final model's weights are written (before the
# tokenizer and summary.json): the checkpoint of the last step is complete, the run is not.
KILL_IN_FINAL_SAVE = """
import os, signal, sys
from transformers import Trainer
from dpolab.cli import main
save_model = Trainer.save_model
def save_then_die(self, output_dir=None, _internal_call=False):
    save_model(self, output_dir, _internal_call)
    if "checkpoint-" not in str(output_dir):
        os.kill(os.getpid(), signal.SIGKILL)
Trainer.save_model = save_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean") / "run"
    assert main([*ARGS, "--output-dir", str(folder)]) == 0
    return folder


def wait_for_step(metrics_path, step: int, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        if metrics_path.exists():
            steps = [json.loads(line)["step"] for line in metrics_path.read_text().splitlines()[:-1]]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)
    raise TimeoutError(f"step {step} never logged")


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


def assert_same_run(resumed_dir, clean_dir):
    resumed, clean = summary(resumed_dir), summary(clean_dir)
    assert resumed["train"]["steps"] == clean["train"]["steps"] == 24
    # The mean over ALL 24 steps, not over the steps trained after the resume.
    assert resumed["train"]["loss"] == pytest.approx(clean["train"]["loss"], abs=1e-9)
    for key, value in clean["eval"].items():
        assert resumed["eval"][key] == pytest.approx(value, abs=1e-6), key
    assert [(r["split"], r["step"]) for r in rows(resumed_dir)] == [(r["split"], r["step"]) for r in rows(clean_dir)]
    assert [r["loss"] for r in rows(resumed_dir)] == pytest.approx([r["loss"] for r in rows(clean_dir)], abs=1e-6)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, clean_dir, capsys):
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "dpolab.cli", *ARGS, "--output-dir", str(killed_dir)],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # A complete row at step >= 8 is followed by the step-10 row: checkpoint-9 was written
        # right after the step-9 row (saving is synchronous).
        wait_for_step(killed_dir / "metrics.jsonl", 8, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "summary.json").exists()
    assert (killed_dir / "checkpoints" / "checkpoint-9").is_dir()

    # A resume continues the same training: a setting that changes what is trained is refused, and
    # the run's records are left as they were.
    config_before = (killed_dir / "config.yaml").read_bytes()
    assert main([*ARGS, "--output-dir", str(killed_dir), "--resume", "--beta", "0.5", "--learning-rate", "1e-2"]) == 2
    error = capsys.readouterr().err
    assert "this command sets beta 0.5, learning_rate 0.01, but" in error and "trained with beta 0.1, learning_rate" in error
    assert (killed_dir / "config.yaml").read_bytes() == config_before
    time_at_checkpoint = max(r["time_s"] for r in rows(killed_dir) if r["step"] <= 9)

    # Allowed changes (how it is logged) are recorded at the step they start from.
    assert main([*ARGS, "--output-dir", str(killed_dir), "--resume", "--logging-steps", "5", "--save-total-limit", "3"]) == 0
    assert json.loads((killed_dir / "run.json").read_text())["resumes"] == [
        {"from_step": 9, "changed": {"save_total_limit": [2, 3]}}]
    assert_same_run(killed_dir, clean_dir)
    # The wall time is the whole run's, not only the resumed part's.
    assert summary(killed_dir)["wall_time_s"] > time_at_checkpoint
    # Train rows cover every step once: one at each log interval and each checkpoint.
    assert [r["step"] for r in rows(clean_dir) if r["split"] == "train"] == [
        1, 3, 5, 6, 9, 10, 12, 15, 18, 20, 21, 24]


def test_sigkill_during_the_final_save_then_resume_trains_no_step_past_max_steps(tmp_path, clean_dir):
    killed_dir = tmp_path / "killed"
    process = subprocess.run([sys.executable, "-c", KILL_IN_FINAL_SAVE, *ARGS, "--output-dir", str(killed_dir)],
                             env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert process.returncode == -signal.SIGKILL
    assert (killed_dir / "checkpoints" / "checkpoint-24").is_dir()
    assert not (killed_dir / "summary.json").exists()

    assert main([*ARGS, "--output-dir", str(killed_dir), "--resume"]) == 0
    assert_same_run(killed_dir, clean_dir)
    # With a constant learning rate one extra step would change every weight.
    resumed, clean = (load_file(d / "model" / "model.safetensors") for d in (killed_dir, clean_dir))
    assert resumed.keys() == clean.keys()
    for name, tensor in clean.items():
        assert resumed[name].equal(tensor), name


def test_resume_of_a_finished_run_leaves_it_untouched(clean_dir, capsys):
    records = {name: (clean_dir / name).read_bytes() for name in ("config.yaml", "summary.json", "run.json")}
    # Asking for fewer steps would rewrite what the run was: refused in one line, nothing changes.
    assert main([*ARGS, "--output-dir", str(clean_dir), "--resume", "--max-steps", "2"]) == 2
    assert "this command sets max_steps 2, but" in capsys.readouterr().err
    # The same command again: nothing to train, nothing rewritten.
    assert main([*ARGS, "--output-dir", str(clean_dir), "--resume"]) == 0
    assert {name: (clean_dir / name).read_bytes() for name in records} == records
