"""Crash safety: SIGKILL training after a checkpoint, resume, and end exactly where an
uninterrupted run ends (CPU training is deterministic)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dpolab.cli import main

ARGS = ["train", "--config", "configs/tiny.yaml", "--max-train-pairs", "96", "--max-eval-pairs", "16",
        "--per-device-train-batch-size", "4", "--max-steps", "24", "--save-steps", "3", "--logging-steps", "1",
        "--eval-steps", "12", "--seed", "3"]


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


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "dpolab.cli", *ARGS, "--output-dir", str(killed_dir)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Step 8 logged means the step-6 checkpoint was fully written (saving is synchronous).
        wait_for_step(killed_dir / "metrics.jsonl", 8, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "summary.json").exists()
    assert (killed_dir / "checkpoints" / "checkpoint-6").is_dir()

    assert main([*ARGS, "--output-dir", str(killed_dir), "--resume"]) == 0
    assert main([*ARGS, "--output-dir", str(clean_dir)]) == 0

    resumed, clean = (json.loads((d / "summary.json").read_text()) for d in (killed_dir, clean_dir))
    assert resumed["train"]["steps"] == clean["train"]["steps"] == 24
    for key, value in clean["eval"].items():
        assert resumed["eval"][key] == pytest.approx(value, abs=1e-6), key

    def losses(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [(r["split"], r["step"], r["loss"]) for r in rows]

    assert [row[:2] for row in losses(killed_dir)] == [row[:2] for row in losses(clean_dir)]  # no duplicate rows
    assert [row[2] for row in losses(killed_dir)] == pytest.approx([row[2] for row in losses(clean_dir)], abs=1e-6)
