"""Data-parallel training is the same computation: 2 processes x 2 pairs == 1 process x 4 pairs.

Both runs use the random sampler with the same seed (``group_by_length: false``). Accelerate
shards a DataLoader by whole batches (``split_batches=False``): with 2 processes at batch 2, the
sampler's batches [i0 i1] [i2 i3] go to rank 0 and rank 1, so the global step sees exactly the
pairs i0..i3 that the 1-process run sees at batch 4, and DDP's gradient average over ranks equals
the mean over the 4 pairs. So the logged losses (averaged over ranks by Trainer) must agree.
"""

from __future__ import annotations

import json
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
                  group_by_length=False, seed=0, dtype="fp32", cache_dir=str(tmp_path / "cache"))
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


FSDP_LAUNCHER = """
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from dpolab.config import TrainConfig
from dpolab.data import prepare_data
from dpolab.scoring.collate import PreferenceCollator
from dpolab.scoring.logps import concatenated_forward, output_weight
from dpolab.scoring.loss import preference_loss
from dpolab.model import disable_dropout, load_model, load_tokenizer

world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
config = TrainConfig(model="tiny-gpt2", max_train_pairs=12, max_eval_pairs=1, max_length=128,
                     max_prompt_length=64, seed=0, cache_dir=sys.argv[2])
tokenizer = load_tokenizer(config.model)
pairs = prepare_data(config, tokenizer)[0]["train"]
collate = PreferenceCollator(tokenizer.pad_token_id)
results = {}
for layout in ("head-in-root", "head-own-unit"):
    model = load_model(config.model)
    disable_dropout(model)
    if layout == "head-own-unit":  # an untied head, sharded as its own FSDP unit
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    if world > 1:  # what accelerate's FSDP2 plugin does with transformer-layer wrapping: blocks, then root
        for block in model.transformer.h:
            fully_shard(block)
        if layout == "head-own-unit":
            fully_shard(model.lm_head)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # plain SGD: a wrongly scaled gradient shows
    losses, head_grad_norms = [], []
    for step in range(3):
        indices = list(range(4 * step, 4 * step + 4))
        if world > 1:
            indices = indices[2 * rank:2 * rank + 2]
        batch = collate([pairs[i] for i in indices])
        chosen, rejected = concatenated_forward(model, batch, chunk_size=32)
        ref = torch.full_like(chosen, -300.0)
        loss = preference_loss(chosen, rejected, ref, ref, beta=0.1, loss_type="sigmoid", label_smoothing=0.0)[0].mean()
        loss.backward()
        grad = output_weight(model).grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        head_grad_norms.append(float(grad.norm()))
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    results[layout] = {"losses": losses, "head_grad_norms": head_grad_norms}
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
if world > 1:
    dist.destroy_process_group()
# Leave without C++ static destructors. With gloo + FSDP2 on CPU (torch 2.13), about 1 exit in 12 on a
# loaded 2-core machine aborts AFTER this script's last line ("terminate called without an active
# exception": a joinable std::thread destroyed at interpreter teardown), failing torchrun though every
# figure this test checks is already on disk. os._exit skips only that teardown.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process(tmp_path):
    """The answer-only head under FSDP2 sharding (gloo, CPU): 2 ranks x 2 pairs == 1 process x 4 pairs.

    The head reads the LM-head weight after the model's forward (scoring/logps.py), the pattern that
    breaks under sharding. Two layouts: the head tied into the root unit (GPT-2 under accelerate's
    transformer-layer wrapping) and the head as its own unit (sharded after its forward: gathered
    by ``gathered_output_weight``). SGD, so a gradient that was not averaged over ranks would change
    the losses, and the head's gradient is compared directly.

    Why not `dpolab train` under FSDP here: accelerate turns FSDP on only for GPU-type distributed
    runs (``AcceleratorState`` sets ``DistributedType.FSDP`` inside its MULTI_GPU/NPU/XPU branch),
    so Trainer + FSDP cannot run on CPU. This test wraps with ``fully_shard`` exactly as accelerate's
    plugin does; ``benchmarks/gpu_check.py`` runs the Trainer + FSDP path on a GPU (its ``fsdp`` stage).
    """
    launcher = tmp_path / "fsdp_launch.py"
    launcher.write_text(FSDP_LAUNCHER)
    cache = str(tmp_path / "cache")
    _run([sys.executable, str(launcher), str(tmp_path / "one.json"), cache], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(launcher), str(tmp_path / "two.json"), cache], tmp_path)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    for layout in ("head-in-root", "head-own-unit"):
        a, b = one[layout], two[layout]
        assert abs(a["losses"][2] - a["losses"][0]) > 1e-3, layout  # training moved: not a vacuous match
        for x, y in zip(a["losses"], b["losses"], strict=True):
            assert abs(x - y) < 1e-4, (layout, a, b)
        for x, y in zip(a["head_grad_norms"], b["head_grad_norms"], strict=True):
            assert abs(x - y) < 1e-4 * max(1.0, x), (layout, a, b)
