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


# -- the rest of the family, by hand ------------------------------------------------------------

LENGTHS = {"chosen_lengths": torch.tensor([4.0]), "rejected_lengths": torch.tensor([2.0])}


def test_rdpo_length_term_by_hand():
    """R-DPO, beta 0.5, alpha 0.1: chosen 4 tokens, rejected 2, so alpha (|y_w| - |y_l|) = +0.2 and
    the loss is -log sigmoid(1 + 0.2) = log(1 + e^-1.2) = 0.2632825: a longer chosen answer needs a
    smaller margin (its length explains part of the preference); a shorter one a larger margin."""
    losses, chosen, _ = preference_loss(*ARGS, beta=0.5, rdpo_alpha=0.1, **LENGTHS)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.2)), abs=1e-7)
    assert losses.item() == pytest.approx(0.2632825, abs=1e-7)
    assert losses.item() < preference_loss(*ARGS, beta=0.5)[0].item()  # less than DPO's 0.3132617
    shorter_chosen = {"chosen_lengths": torch.tensor([2.0]), "rejected_lengths": torch.tensor([4.0])}
    assert preference_loss(*ARGS, beta=0.5, rdpo_alpha=0.1, **shorter_chosen)[0].item() == pytest.approx(
        math.log(1 + math.exp(-0.8)), abs=1e-7)  # 0.3711007 > DPO's
    assert chosen.item() == pytest.approx(0.5)  # the rewards stay DPO's


def test_simpo_by_hand_without_reference():
    """SimPO, beta 2, gamma 1: per-token log-probs -1/4 (chosen) and -3/2 (rejected), so
    beta (-0.25 + 1.5) - gamma = 1.5 and the loss is log(1 + e^-1.5) = 0.2014133."""
    losses, chosen, rejected = preference_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), None, None, beta=2.0,
                                               loss_type="simpo", simpo_gamma=1.0, **LENGTHS)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-7)
    assert chosen.item() == pytest.approx(-0.5) and rejected.item() == pytest.approx(-3.0)  # beta x per-token log pi
    default_gamma = preference_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), None, None, beta=2.0,
                                    loss_type="simpo", **LENGTHS)[0]
    assert default_gamma.item() == pytest.approx(losses.item())  # None = beta / 2 = 1.0
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), None, None, beta=2.0)


def test_ld_dpo_counts_the_longer_answers_tail_at_ld_alpha():
    from dpolab.scoring.loss import ld_logps, pair_losses

    # chosen -10 over 4 tokens of which the last 2 (beyond the rejected's 2) sum to -6; rejected -3.
    policy = {"chosen_logps": torch.tensor([-10.0]), "rejected_logps": torch.tensor([-3.0]),
              "chosen_tail_logps": torch.tensor([-6.0]), "rejected_tail_logps": torch.tensor([0.0])}
    assert ld_logps(policy["chosen_logps"], policy["chosen_tail_logps"], 0.5).item() == -7.0  # -4 + 0.5 x -6
    reference = {k: torch.zeros(1) for k in policy}
    out = pair_losses(policy, reference, **LENGTHS, loss_terms=[("sigmoid", 1.0)], beta=0.5, ld_alpha=0.5)
    assert out["losses"].item() == pytest.approx(math.log(1 + math.exp(-0.5 * (-7.0 + 3.0))), abs=1e-6)
    assert out["policy_chosen_logps"].item() == -7.0  # logged as the loss read it, as TRL does


def test_weighted_terms_sft_and_wpo_weights_by_hand():
    from dpolab.scoring.loss import pair_losses, wpo_weights

    # sigmoid 0.3132617 (ARGS at beta 0.5) x 1 + sft 0.5 x -sum(chosen log-probs) / sum(chosen tokens) = 1 / 4
    policy = {"chosen_logps": ARGS[0], "rejected_logps": ARGS[1]}
    reference = {"chosen_logps": ARGS[2], "rejected_logps": ARGS[3]}
    out = pair_losses(policy, reference, **LENGTHS, loss_terms=[("sigmoid", 1.0), ("sft", 0.5)], beta=0.5)
    assert out["losses"].item() == pytest.approx(0.3132617 + 0.5 * 0.25, abs=1e-6)
    # WPO: mean aligned log-probs -0.2 (chosen, -0.8 over 4) and -0.1 (rejected): weight e^-0.3
    weights = wpo_weights(torch.tensor([-0.8]), torch.tensor([-0.2]), **LENGTHS)
    assert weights.item() == pytest.approx(math.exp(-0.3))
    weighted = pair_losses({**policy, "chosen_aligned_logps": torch.tensor([-0.8]),
                            "rejected_aligned_logps": torch.tensor([-0.2])}, reference, **LENGTHS,
                           loss_terms=[("sigmoid", 1.0)], beta=0.5, use_weighting=True)
    assert weighted["losses"].item() == pytest.approx(0.3132617 * math.exp(-0.3), abs=1e-6)


def test_aot_sorts_across_the_batch():
    """AOT compares the batch's sorted policy log-ratios with the sorted reference ones: swapping
    which pair has which reference margin changes nothing."""
    policy_chosen, policy_rejected = torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0])  # margins 2, -1
    a = preference_loss(policy_chosen, policy_rejected, torch.tensor([-2.0, -2.0]), torch.tensor([-2.5, -1.0]),
                        beta=1.0, loss_type="aot")[0]  # reference margins 0.5, -1
    b = preference_loss(policy_chosen, policy_rejected, torch.tensor([-2.0, -2.0]), torch.tensor([-1.0, -2.5]),
                        beta=1.0, loss_type="aot")[0]  # the same margins, other pairs
    sorted_delta = torch.tensor([-1.0 - -1.0, 2.0 - 0.5])
    assert torch.allclose(a, -torch.nn.functional.logsigmoid(sorted_delta)) and torch.allclose(a, b)


def test_forward_kl_score_by_hand():
    from dpolab.scoring.loss import f_divergence_score

    u = torch.tensor([math.log(2.0), 0.0])
    assert torch.allclose(f_divergence_score(u, "forward_kl"), torch.tensor([0.5, 0.0]))  # 1 - 1/t
    assert torch.allclose(f_divergence_score(u, "js_divergence"), torch.tensor([math.log(4 / 3), 0.0]))  # log 2t/(t+1)
