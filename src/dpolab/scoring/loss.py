"""DPO-family preference losses as pure functions (no model, no state): easy to test by hand.

Notation (DPO paper, arXiv 2305.18290): for a prompt x with preferred answer y_w and
dispreferred answer y_l, the implicit reward of the policy pi_theta relative to the frozen
reference pi_ref is

    r(x, y) = beta * (log pi_theta(y|x) - log pi_ref(y|x))

and DPO minimises  -log sigmoid(r(x, y_w) - r(x, y_l))   (Eq. 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss and implicit rewards.

    Args:
        policy_chosen_logps: (B,) summed log-prob of each chosen answer under the policy.
        policy_rejected_logps: (B,) same for the rejected answers.
        reference_chosen_logps: (B,) summed log-prob of each chosen answer under the reference.
        reference_rejected_logps: (B,) same for the rejected answers.
        beta: temperature of the implicit reward; 0.1-0.5 typical. For ``ipo`` it is tau.
        loss_type:
            ``sigmoid``: DPO, Eq. 7. With ``label_smoothing`` = eps > 0 it is conservative DPO
                (cDPO): labels are assumed flipped with probability eps.
            ``ipo``: IPO (arXiv 2310.12036, Eq. 17): (h - 1/(2 tau))^2, where each log-ratio is
                divided by its answer length first. The summed form makes the squared loss grow
                with answer length; the per-token form is what the IPO paper's results used (TRL
                confirmed it with the authors) and what TRL computes, so numbers compare.
            ``hinge``: SLiC (arXiv 2305.10425): relu(1 - beta * h).
        label_smoothing: eps in [0, 0.5), ``sigmoid`` only.
        chosen_lengths: (B,) answer tokens of each chosen answer; required for ``ipo``.
        rejected_lengths: (B,) same for the rejected answers.

    Returns:
        losses: (B,) loss per pair (the caller averages).
        chosen_rewards: (B,) beta * (policy - reference) log-ratio of the chosen answers, detached.
        rejected_rewards: (B,) same for the rejected answers, detached.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    logits = chosen_logratios - rejected_logratios  # (B,) h in the papers

    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths")
        per_token_logits = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths  # (B,)
        losses = (per_token_logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, ipo or hinge")

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def preference_metrics(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, float]:
    """Batch means under TRL's metric names, so runs compare key by key with TRL's DPOTrainer."""
    return {
        "loss": losses.detach().mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Mean per-token negative log-likelihood of the chosen answers: the RPO / NLL term.

    RPO (arXiv 2404.19733) adds ``rpo_alpha`` times this to the DPO loss so the chosen answers'
    likelihood cannot fall while the margin grows (TRL 1.16: ``loss_type=[..., "sft"]`` with
    weight alpha; OpenRLHF: ``nll_loss_coef``). The mean is over every chosen answer token of the
    batch, as TRL takes it, so a summed log-prob over total length gives it exactly.

    Args:
        policy_chosen_logps: (B,) summed log-prob of each chosen answer under the policy.
        chosen_lengths: (B,) answer tokens of each chosen answer.

    Returns: () scalar.
    """
    return -policy_chosen_logps.sum() / chosen_lengths.sum()
