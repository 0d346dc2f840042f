"""DPO-family losses against numbers worked out by hand."""

import math

import pytest
import torch

from dpolab.scoring.loss import preference_loss, preference_metrics

# policy log-probs: chosen -1, rejected -3; reference: both -2; beta 0.5
# log-ratios: chosen +1, rejected -1, so h = 2 and beta * h = 1.
ARGS = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))


def test_sigmoid_by_hand():
    losses, chosen, rejected = preference_loss(*ARGS, beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)))  # -log sigmoid(1) = 0.3132617
    assert losses.item() == pytest.approx(0.3132617, abs=1e-7)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)


def test_conservative_dpo_label_smoothing_by_hand():
    losses, _, _ = preference_loss(*ARGS, beta=0.5, label_smoothing=0.1)
    # 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1) = 0.9 * 0.3132617 + 0.1 * 1.3132617
    assert losses.item() == pytest.approx(0.4132617, abs=1e-7)


def test_ipo_by_hand():
    one = torch.tensor([1.0])
    losses, _, _ = preference_loss(*ARGS, beta=0.5, loss_type="ipo", chosen_lengths=one, rejected_lengths=one)
    assert losses.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)  # = 1.0
    # per-token log-ratios: chosen +1 over 2 tokens, rejected -1 over 1 token: h = 0.5 + 1 = 1.5
    losses, chosen, _ = preference_loss(*ARGS, beta=0.5, loss_type="ipo", chosen_lengths=torch.tensor([2.0]),
                                        rejected_lengths=one)
    assert losses.item() == pytest.approx((1.5 - 1) ** 2)  # = 0.25
    assert chosen.item() == pytest.approx(0.5)  # rewards stay on summed log-ratios (as in TRL)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        preference_loss(*ARGS, beta=0.5, loss_type="ipo")


def test_hinge_by_hand():
    assert preference_loss(*ARGS, beta=0.5, loss_type="hinge")[0].item() == 0.0  # relu(1 - 1)
    assert preference_loss(*ARGS, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(0.5)  # relu(1 - .5)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    logps = torch.tensor([-12.5, -40.0, -3.25])
    losses, chosen, rejected = preference_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_metrics_use_trl_names_and_means():
    losses, chosen, rejected = preference_loss(
        torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0]), torch.tensor([-2.0, -2.0]),
        torch.tensor([-2.0, -2.0]), beta=1.0)
    metrics = preference_metrics(losses, chosen, rejected, torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0]))
    assert set(metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                            "rewards/margins", "logps/chosen", "logps/rejected"}
    assert metrics["rewards/accuracies"] == 0.5  # pair 1 right (1 > -1), pair 2 wrong (-3 < -2)
    assert metrics["rewards/margins"] == pytest.approx(((1 + 1) + (-3 + 2)) / 2)
    assert metrics["logps/chosen"] == -3.0


def test_gradient_pushes_chosen_up_and_rejected_down():
    policy_chosen = torch.tensor([-2.0], requires_grad=True)
    policy_rejected = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = preference_loss(policy_chosen, policy_rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1)
    losses.sum().backward()
    # d/dh -log sigmoid(beta h) at h = 0 is -beta/2
    assert policy_chosen.grad.item() == pytest.approx(-0.05)
    assert policy_rejected.grad.item() == pytest.approx(0.05)


def test_chosen_nll_is_the_token_mean_not_the_pair_mean():
    from dpolab.scoring.loss import chosen_nll

    # Pair 1: 2 tokens summing to -4; pair 2: 6 tokens summing to -3. Token mean: 7/8, not (2 + 0.5)/2.
    nll = chosen_nll(torch.tensor([-4.0, -3.0]), torch.tensor([2.0, 6.0]))
    assert nll.item() == pytest.approx(7 / 8)
