"""Token-budget steps (``max_tokens_per_batch``): an optimizer batch split into micro-batches by
tokens gives the loss and gradients of the same pairs in pair micro-batches with accumulation."""

import pytest
import torch
from transformers import TrainerCallback

from dpolab.cli import main
from dpolab.dpo.trainer import DpolabTrainer, train
from dpolab.scoring.collate import PreferenceCollator, token_budget_groups
from tests.conftest import tiny_config


def test_token_budget_groups_are_balanced_and_within_the_budget():
    # 16 tokens, budget 8: two groups. Largest first into the lighter group: 5 | 4, 3 -> 5+3 | 4+3,
    # 1 -> 8 | 8. Indices keep their order inside a group.
    assert token_budget_groups([5, 4, 3, 3, 1], 8) == [[0, 3], [1, 2, 4]]
    assert token_budget_groups([5, 4, 3, 3, 1], 100) == [[0, 1, 2, 3, 4]]
    # An item over the budget goes alone; two groups would not do (10 > 4), so it ends one per item.
    assert token_budget_groups([10, 1], 4) == [[0], [1]]


def test_the_collator_splits_a_batch_into_micro_batches_of_whole_pairs():
    pairs = [{"prompt_ids": [1] * 3, "chosen_ids": [2] * 2, "rejected_ids": [3] * 1},  # 9 tokens
             {"prompt_ids": [1] * 2, "chosen_ids": [2] * 1, "rejected_ids": [3] * 3},  # 8 tokens
             {"prompt_ids": [1] * 1, "chosen_ids": [2] * 1, "rejected_ids": [3] * 1}]  # 4 tokens
    batch = PreferenceCollator(pad_token_id=0, packed=True, max_tokens=12)(pairs)
    micro = batch["micro_batches"]
    assert [m["answer_lengths"].tolist() for m in micro] == [[2, 1], [1, 1, 3, 1]]  # pair 0 | pairs 1, 2 (chosen, rejected)
    assert [int((m["sequence_index"] >= 0).sum()) for m in micro] == [9, 12]


class GradientRecorder(TrainerCallback):
    """Every parameter's gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})


def train_recording(tmp_path, name, monkeypatch, **overrides):
    """Losses, gradients and the number of forward passes per step of a 2-step run of 6-pair batches."""
    forwards = []
    compute_loss = DpolabTrainer.compute_loss

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            forwards.append(self.state.global_step)
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DpolabTrainer, "compute_loss", counting)
    recorder = GradientRecorder()
    config = tiny_config(max_steps=2, max_train_pairs=12, max_eval_pairs=4, group_by_length=False,
                         max_grad_norm=1e9, **overrides)  # no clipping: compare the raw gradients
    run = train(config, tmp_path / name, callbacks=[recorder])
    return [row["loss"] for row in run.metrics("train")], recorder.steps, [forwards.count(s) for s in (0, 1)]


@pytest.mark.parametrize(("rpo_alpha", "reference"), [
    (0.0, dict(per_device_train_batch_size=2, gradient_accumulation_steps=3)),
])
def test_a_token_budget_step_equals_the_same_pairs_in_pair_batches(tmp_path, monkeypatch, rpo_alpha, reference):
    pairs_losses, pairs_grads, pairs_forwards = train_recording(tmp_path, "pairs", monkeypatch, rpo_alpha=rpo_alpha,
                                                                **reference)
    budget_losses, budget_grads, budget_forwards = train_recording(
        tmp_path, "budget", monkeypatch, rpo_alpha=rpo_alpha, per_device_train_batch_size=2,
        gradient_accumulation_steps=3, max_tokens_per_batch=1024)
    assert pairs_forwards == [reference["gradient_accumulation_steps"]] * 2
    assert all(1 < n < 3 for n in budget_forwards), budget_forwards  # ~1,900 tokens a step in 1,024-token pieces
    assert budget_losses == pytest.approx(pairs_losses, abs=1e-6)
    assert len(budget_grads) == len(pairs_grads) == 2
    # Packed rows sum attention in another grouping when the pieces differ (~1e-7 relative per
    # log-prob): each parameter's gradient must agree to 1e-5 of its norm (a lost or doubled
    # micro-batch would be off by tens of percent).
    for budget, pairs in zip(budget_grads, pairs_grads, strict=True):  # step 2: after an update from step 1
        errors = {name: float((budget[name] - grad).norm() / grad.norm()) for name, grad in pairs.items()}
        assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda item: item[1])


def test_a_budget_that_cannot_hold_a_pair_is_one_line(tmp_path, capsys):
    argv = ["train", "--config", "configs/tiny.yaml", "--max-steps", "1", "--max-length", "256",
            "--max-prompt-length", "128", "--max-tokens-per-batch", "300", "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_tokens_per_batch (300) must be at least 2 x max_length (512)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", [["--rpo-alpha", "0.5"], ["--loss-type", "sigmoid,sft"], ["--loss-type", "aot"]])
def test_a_budget_with_a_batch_level_loss_term_is_one_line(tmp_path, capsys, option):
    """sft's token mean and aot's sorting are over the whole batch: split pieces would change them."""
    argv = ["train", "--config", "configs/tiny.yaml", "--max-steps", "1", "--max-tokens-per-batch", "2048",
            *option, "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "are computed over a whole batch" in capsys.readouterr().err
