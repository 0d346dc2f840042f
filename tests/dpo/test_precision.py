"""bf16 training on CPU: bf16 weights with an fp32 master copy, and how `dtype: auto` chooses."""

import json
import math

import pytest
import torch

from dpolab import precision, stage_setup
from dpolab.data import prepare_data
from dpolab.errors import ConfigError
from dpolab.model import build_builtin, load_tokenizer
from dpolab.precision import MasterWeightAdamW, uses_bf16_weights
from dpolab.scoring.collate import PreferenceCollator
from dpolab.stage_setup import resolve_dtype
from tests.conftest import tiny_config
from tests.dpo.golden import GOLDEN_PATH, golden_losses

# bf16 keeps 8 mantissa bits: the forward pass differs from fp32 by ~0.4% per activation. Over the
# 5 golden steps the loss moved by at most 5e-4 from fp32's (measured); 2e-3 leaves room for other
# CPUs' kernels, and is still 10x below the step-to-step changes (>= 1e-2) the test must not hide.
BF16_LOSS_TOLERANCE = 2e-3


def test_bf16_losses_stay_within_tolerance_of_fp32_over_the_golden_steps(tmp_path):
    expected = json.loads(GOLDEN_PATH.read_text())["losses"]  # recorded in fp32
    losses = golden_losses(tmp_path / "bf16", dtype="bf16", device="cpu")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference (both bf16) at step 1
    assert losses == pytest.approx(expected, abs=BF16_LOSS_TOLERANCE)
    assert losses != pytest.approx(expected, abs=1e-6)  # it really ran in bf16
    saved = json.loads((tmp_path / "bf16" / "model" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16"  # trained as bf16 weights, not fp32 under autocast


def test_master_copy_keeps_updates_that_bf16_weights_alone_would_lose():
    # 1.0 in bf16 has a spacing of 2^-7 just below it: 50 AdamW steps of ~1e-4 each are each far
    # below it. Applied to the bf16 weight directly they all round away; the fp32 master keeps them.
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    mastered = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain_opt = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    master_opt = MasterWeightAdamW([mastered], lr=1e-4, weight_decay=0.0)
    for _ in range(50):
        for param, optimizer in ((plain, plain_opt), (mastered, master_opt)):
            param.grad = torch.ones_like(param)
            optimizer.step()
            optimizer.zero_grad()
    master = master_opt.masters()[0]
    assert master.dtype == torch.float32 and torch.allclose(master, torch.full((4,), 1 - 50e-4), atol=1e-5)
    assert torch.equal(mastered.detach(), master.to(torch.bfloat16))  # the model holds the rounded master
    assert torch.equal(plain.detach(), torch.ones(4, dtype=torch.bfloat16))  # every update was lost
    assert mastered.grad is None


def test_master_copy_survives_a_checkpoint():
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    optimizer = MasterWeightAdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    resumed_model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    resumed = MasterWeightAdamW(resumed_model.parameters(), lr=1e-3)
    resumed.load_state_dict(state)
    for a, b in zip(optimizer.masters(), resumed.masters(), strict=True):
        assert torch.equal(a, b)  # the fp32 bits, not just the bf16 rounding
    assert torch.equal(resumed_model.weight, model.weight)


def _auto(tmp_path, **overrides):
    config = tiny_config(dtype="auto", cache_dir=str(tmp_path / "cache"), **overrides)
    tokenizer = load_tokenizer("tiny-gpt2")
    train_set = prepare_data(config, tokenizer)[0]["train"]
    model = build_builtin("tiny-gpt2")
    return resolve_dtype(config, "cpu", model, train_set, PreferenceCollator(tokenizer.pad_token_id, packed=True))


def test_dtype_auto_on_cpu_follows_this_models_step_and_remembers_it(tmp_path, monkeypatch):
    monkeypatch.delenv(stage_setup.AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(stage_setup, "cpu_bf16_flags", lambda: ("amx_bf16",))
    monkeypatch.setattr(stage_setup, "probe_step", lambda *a: (0.030, 0.028, 384))  # bf16 not clearly faster
    dtype, choice = _auto(tmp_path)
    assert (dtype, choice["by"], choice["bf16_speedup"]) == ("fp32", "probe", pytest.approx(0.030 / 0.028, abs=1e-3))

    # The verdict is remembered for this CPU and architecture: the next run does not probe again
    # and cannot flip with a noisy neighbour.
    monkeypatch.setattr(stage_setup, "probe_step", lambda *a: pytest.fail("probed twice"))
    assert _auto(tmp_path)[0] == "fp32" and _auto(tmp_path)[1]["by"] == "probe (cached)"

    monkeypatch.setattr(stage_setup, "probe_step", lambda *a: (0.030, 0.010, 384))
    dtype, choice = _auto(tmp_path / "other")
    assert (dtype, choice["fp32_ms"], choice["bf16_ms"]) == ("bf16", 30.0, 10.0)


def test_dtype_auto_without_bf16_instructions_or_with_the_switch(tmp_path, monkeypatch):
    monkeypatch.delenv(stage_setup.AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(stage_setup, "cpu_bf16_flags", lambda: ())
    monkeypatch.setattr(stage_setup, "probe_step", lambda *a: pytest.fail("no bf16 instructions: no probe"))
    assert _auto(tmp_path)[0] == "fp32"
    # The documented switch makes `auto` resolve as a bf16 CPU would, on any CPU.
    monkeypatch.setenv(stage_setup.AUTO_DTYPE_ENV, "bf16")
    assert _auto(tmp_path) == ("bf16", {"by": "environment (DPOLAB_AUTO_DTYPE=bf16)"})
    monkeypatch.setenv(stage_setup.AUTO_DTYPE_ENV, "bf17")
    with pytest.raises(ConfigError, match="DPOLAB_AUTO_DTYPE='bf17': must be bf16 or fp32"):
        _auto(tmp_path)
    assert uses_bf16_weights("cpu", "bf16") and not uses_bf16_weights("cuda", "bf16")
    assert not uses_bf16_weights("cpu", "fp32")


def test_the_probe_times_whole_steps_and_leaves_the_model_as_it_was():
    config = tiny_config()
    tokenizer = load_tokenizer("tiny-gpt2")
    train_set = prepare_data(config, tokenizer)[0]["train"]
    model = build_builtin("tiny-gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32_s, bf16_s, tokens = stage_setup.probe_step(
        model, train_set, PreferenceCollator(tokenizer.pad_token_id, packed=True), 128)
    assert fp32_s > 0 and bf16_s > 0 and tokens >= stage_setup.PROBE_TOKENS
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # learning rate 0
    assert all(p.grad is None and p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("step_slice", [precision.STEP_SLICE, 5])
def test_clipping_on_the_masters_matches_clip_grad_norm_and_adamw_in_fp32(step_slice, monkeypatch):
    """Two steps with clipping: the masters follow fp32 AdamW on the bf16 gradients cast up and
    clipped by torch's clip_grad_norm_. With slices of 5 elements every tensor (64 and 16 weights,
    8 and 2 biases) is updated in several slices, a last short one included."""
    monkeypatch.setattr(precision, "STEP_SLICE", step_slice)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).to(torch.bfloat16)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    optimizer = MasterWeightAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        model(torch.randn(4, 8, dtype=torch.bfloat16)).square().sum().backward()
        for param, ref in zip(model.parameters(), reference.parameters(), strict=True):
            ref.grad = param.grad.float()
        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        norm = optimizer.clip_master_grads(0.1)
        assert norm > 0.1  # it clipped
        torch.testing.assert_close(norm, expected_norm, rtol=4e-3, atol=0)  # each tensor's norm rounded to bf16
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        for master, param, ref in zip(optimizer.masters(), model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(master, ref.detach())
            assert torch.equal(param.detach(), master.to(torch.bfloat16))
            assert master.grad is None  # no fp32 gradient copy is ever made
