"""bf16 training on CPU: bf16 weights with an fp32 master copy, and how `dtype: auto` chooses."""

import json
import math

import pytest
import torch

from dpolab.model import choose_cpu_dtype, matmul_probe
from dpolab.precision import MasterWeightAdamW, uses_bf16_weights
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


def test_dtype_auto_on_cpu_needs_the_instructions_and_a_faster_probe():
    assert choose_cpu_dtype(("amx_bf16",), fp32_s=0.030, bf16_s=0.010) == "bf16"
    assert choose_cpu_dtype(("avx512_bf16",), fp32_s=0.030, bf16_s=0.028) == "fp32"  # not clearly faster
    assert choose_cpu_dtype((), fp32_s=0.030, bf16_s=0.010) == "fp32"  # no bf16 instructions
    fp32_s, bf16_s = matmul_probe()
    assert 0 < fp32_s < 5 and 0 < bf16_s < 5
    assert uses_bf16_weights("cpu", "bf16") and not uses_bf16_weights("cuda", "bf16")
    assert not uses_bf16_weights("cpu", "fp32")


def test_clipping_on_the_masters_matches_clip_grad_norm_and_adamw_in_fp32():
    """Two steps with clipping: the masters follow fp32 AdamW on the bf16 gradients cast up and
    clipped by torch's clip_grad_norm_ (the buffers kept across steps hold each step's own gradients)."""
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
        torch.testing.assert_close(norm, expected_norm)
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        for master, param, ref in zip(optimizer.masters(), model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(master, ref.detach())
            assert torch.equal(param.detach(), master.to(torch.bfloat16))
