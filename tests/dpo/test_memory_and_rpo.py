"""Gradient checkpointing (same numbers, fewer stored activations) and the RPO / NLL term in a run."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dpolab.config import TrainConfig
from dpolab.data import prepare_data
from dpolab.dpo.trainer import train
from dpolab.model import build_builtin, disable_dropout, load_tokenizer
from dpolab.scoring.collate import PreferenceCollator
from dpolab.scoring.logps import concatenated_forward
from dpolab.scoring.loss import preference_loss
from tests.conftest import tiny_config


def _loss_grads_and_saved_bytes(model, batch) -> tuple[float, dict[str, torch.Tensor], int]:
    """DPO loss of one batch, every parameter's gradient, and the bytes autograd kept for backward."""
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chosen, rejected = concatenated_forward(model, batch)  # (B,), (B,)
        # A fixed reference a little off the policy, so the loss has a real gradient.
        losses, _, _ = preference_loss(chosen, rejected, chosen.detach() + 0.5, rejected.detach() - 0.5, beta=0.1)
        loss = losses.mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    config = TrainConfig(max_train_pairs=4, max_eval_pairs=1, seed=1, cache_dir=str(tmp_path))
    pairs = prepare_data(config, load_tokenizer("tiny-gpt2"))[0]["train"]
    batch = PreferenceCollator(50256)([pairs[i] for i in range(len(pairs))])
    plain = build_builtin("tiny-gpt2")
    disable_dropout(plain)
    checkpointed = copy.deepcopy(plain)
    # The call Trainer makes for --gradient-checkpointing (TrainingArguments in training_arguments).
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain.train()
    checkpointed.train()

    loss_a, grads_a, saved_a = _loss_grads_and_saved_bytes(plain, batch)
    loss_b, grads_b, saved_b = _loss_grads_and_saved_bytes(checkpointed, batch)
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_b[name], grads_a[name], atol=1e-5, rtol=0), name
    assert max(g.abs().max().item() for g in grads_a.values()) > 1e-3  # a real gradient, not all zeros
    assert saved_b < 0.8 * saved_a, (saved_a, saved_b)  # it really stores less for backward


@pytest.mark.slow
def test_rpo_alpha_run_logs_nll_loss_and_adds_it(tmp_path):
    """Step 1 (policy == reference): loss = ln 2 + alpha * nll_loss, nll_loss logged under its TRL name;
    with gradient checkpointing on, the numbers equal a plain run's."""
    common = dict(max_steps=2, max_train_pairs=16, max_eval_pairs=8, rpo_alpha=0.5, eval_steps=2,
                  cache_dir=str(tmp_path / "cache"))
    plain = train(tiny_config(**common), tmp_path / "plain")
    checkpointed = train(tiny_config(**common, gradient_checkpointing=True), tmp_path / "checkpointed")
    first = plain.metrics("train")[0]
    assert first["nll_loss"] > 5  # random tiny model: ~ln 50257 per token
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["nll_loss"], abs=1e-4)
    evaluation = plain.metrics("eval")[-1]
    assert "nll_loss" in evaluation
    for a, b in zip(plain.metrics("train"), checkpointed.metrics("train"), strict=True):
        for key in ("loss", "nll_loss", "grad_norm", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
