"""Data-parallel training is the same computation: 2 processes x 2 pairs == 1 process x 4 pairs.

Both runs use the random sampler with the same seed (``group_by_length: false``). Accelerate
shards a DataLoader by whole batches (``split_batches=False``): with 2 processes at batch 2, the
sampler's batches [i0 i1] [i2 i3] go to rank 0 and rank 1, so the global step sees exactly the
pairs i0..i3 that the 1-process run sees at batch 4, and DDP's gradient average over ranks equals
the mean over the 4 pairs. So the logged losses (averaged over ranks by Trainer) must agree.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed
import yaml

from dpolab.runs import RunFolder

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

LAUNCHER = """
import logging, sys
from dpolab.config import load_config
from dpolab.dpo.trainer import train
logging.basicConfig(level=logging.WARNING)
train(load_config(sys.argv[1]), sys.argv[2])
"""


def _config(tmp_path: Path, batch: int) -> Path:
    values = dict(model="tiny-gpt2", max_train_pairs=32, max_eval_pairs=8, max_length=256, max_prompt_length=128,
                  per_device_train_batch_size=batch, max_steps=3, logging_steps=1, learning_rate=1e-3,
                  group_by_length=False, seed=0, cache_dir=str(tmp_path / "cache"))
    path = tmp_path / f"batch{batch}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _run(cmd: list[str], tmp_path: Path) -> None:
    # One thread per process: two ranks on a 2-core CI machine must not oversubscribe it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_process_with_same_global_batch(tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    single, double = tmp_path / "one-proc", tmp_path / "two-procs"
    _run([sys.executable, str(launcher), str(_config(tmp_path, 4)), str(single)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(launcher), str(_config(tmp_path, 2)), str(double)], tmp_path)

    one, two = RunFolder.open(single).metrics("train"), RunFolder.open(double).metrics("train")
    assert [r["step"] for r in one[:3]] == [r["step"] for r in two[:3]] == [1, 2, 3]  # rank 0 wrote each row once
    assert one[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference
    assert abs(one[1]["loss"] - math.log(2)) > 1e-3  # later steps moved: the comparison is not vacuous
    for a, b in zip(one[:3], two[:3], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * max(1.0, a["grad_norm"]), (a, b)
        assert abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-4, (a, b)  # gathered over both ranks
    summary = RunFolder.open(double).summary()
    assert summary["train"]["steps"] == 3 and summary["eval"]["loss"] > 0
