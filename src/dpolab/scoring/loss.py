"""DPO-family preference losses as pure functions (no model, no state): easy to test by hand.

Notation (DPO paper, arXiv 2305.18290): for a prompt x with preferred answer y_w and
dispreferred answer y_l, the implicit reward of the policy pi_theta relative to the frozen
reference pi_ref is

    r(x, y) = beta * (log pi_theta(y|x) - log pi_ref(y|x))

and DPO minimises  -log sigmoid(r(x, y_w) - r(x, y_l))   (Eq. 7).

Every loss of TRL 1.16's ``DPOTrainer`` is here with its exact formula (``trl/trainer/dpo_trainer.py``,
``_compute_loss``), plus R-DPO (length-regularised DPO) and SimPO (reference-free). Throughout,
B is the number of pairs; log-probs are summed over an answer's tokens (EOS included) and
lengths count those tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Per-pair tensors a scoring pass yields for the policy (and the reference), each (B,):
# ``chosen_logps`` / ``rejected_logps`` always; ``*_tail_logps`` for LD-DPO; ``*_aligned_logps`` for WPO.
AnswerLogps = dict[str, torch.Tensor]


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    *,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    rdpo_alpha: float = 0.0,
    simpo_gamma: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss of one loss type, and the implicit rewards.

    Args:
        policy_chosen_logps: (B,) summed log-prob of each chosen answer under the policy.
        policy_rejected_logps: (B,) same for the rejected answers.
        reference_chosen_logps: (B,) summed log-prob of each chosen answer under the reference;
            None only for the reference-free ``simpo`` and ``sft``.
        reference_rejected_logps: (B,) same for the rejected answers.
        beta: temperature of the implicit reward; 0.1-0.5 typical. For ``ipo`` it is tau; for
            ``simpo`` the reward scale (2.0 in the paper).
        loss_type, with h = f'(ratio_w) - f'(ratio_l) the f-divergence score difference (h = the
            log-ratio difference for the default reverse KL) and lr_w, lr_l the log-ratios
            log pi_theta(y|x) - log pi_ref(y|x):
            ``sigmoid``: DPO, Eq. 7: -log sigma(beta h). With ``label_smoothing`` = eps > 0 it is
                conservative DPO (cDPO): labels are assumed flipped with probability eps (dpolab's;
                TRL 1.16 ignores label_smoothing here). With ``rdpo_alpha`` it is R-DPO (below).
            ``hinge``: SLiC (arXiv 2305.10425): relu(1 - beta h).
            ``ipo``: IPO (arXiv 2310.12036, Eq. 17): (h_tok - 1/(2 tau))^2, where each score is
                divided by its answer length first: the per-token form the IPO paper's results
                used (TRL confirmed it with the authors) and TRL computes.
            ``exo_pair``: EXO (arXiv 2402.00856, Eq. 16): KL(softmax(beta [s_w, s_l]) || [1 - eps, eps]).
            ``nca_pair``: NCA (arXiv 2402.05369): -log sigma(beta lr_w) - (log sigma(-beta lr_w)
                + log sigma(-beta lr_l)) / 2.
            ``robust``: Robust DPO (arXiv 2403.00409): ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps),
                l(h) = -log sigma(beta h): unbiased under label flips with probability eps.
            ``bco_pair``: BCO on pairs (arXiv 2404.04656): -log sigma(beta lr_w) - log sigma(-beta lr_l).
            ``sppo_hard``: SPPO with hard labels (arXiv 2405.00675, Eq. 4.7):
                (lr_w - 1/(2 beta))^2 + (lr_l + 1/(2 beta))^2.
            ``aot``: AOT (arXiv 2406.05882), paired: the batch's policy log-prob differences
                (log pi(y_w) - log pi(y_l)) sorted, minus the reference's sorted, through the
                cDPO loss. A batch-level loss: each pair's value depends on the others.
            ``aot_unpaired``: AOT unpaired: sorted lr_w minus sorted lr_l, through the cDPO loss.
            ``apo_zero``: APO-zero (arXiv 2408.06266, Eq. 7): 1 - sigma(beta lr_w) + sigma(beta lr_l).
            ``apo_down``: APO-down (Eq. 8): sigma(beta lr_w) + 1 - sigma(beta (lr_w - lr_l)).
            ``discopop``: DiscoPOP (arXiv 2406.08414, Eq. 5): with z = beta h and
                m = sigma(z / tau), (1 - m) (-log sigma(z)) + m exp(-z).
            ``sft``: the chosen answers' NLL, -sum(log pi(y_w)) / sum(|y_w|) over the batch's
                tokens (a batch-level number, the same for every pair); RPO is sigmoid + alpha sft.
            ``sigmoid_norm``: DPO on per-token scores: -log sigma(beta (s_w/|y_w| - s_l/|y_l|)).
            ``simpo``: SimPO (arXiv 2405.14734, Eq. 6), reference-free:
                -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma), with cDPO's
                label smoothing as TRL's CPOTrainer (loss_type="simpo", cpo_alpha=0) computes it.
        label_smoothing: eps in [0, 0.5): ``sigmoid`` (cDPO), ``robust``, ``exo_pair``, ``aot``,
            ``aot_unpaired``, ``simpo``.
        chosen_lengths: (B,) answer tokens of each chosen answer; required for ``ipo``,
            ``sigmoid_norm``, ``sft``, ``simpo``, and R-DPO.
        rejected_lengths: (B,) same for the rejected answers.
        f_divergence_type: f-DPO (arXiv 2309.16240) score of a log-ratio u: ``reverse_kl`` u (DPO),
            ``forward_kl`` 1 - exp(-u), ``js_divergence`` log 2 + log sigma(u), ``alpha_divergence``
            (exp((a - 1) u) - 1) / (a - 1) with a = ``f_alpha_divergence_coef``.
        discopop_tau: DiscoPOP's tau.
        rdpo_alpha: R-DPO (Park et al. 2024, arXiv 2403.19159, its length-regularised DPO loss), ``sigmoid`` only:

                -log sigma(beta h + alpha (|y_w| - |y_l|))

            The RLHF objective with a length penalty, max E[r(x, y) - alpha |y|] - beta KL, has the
            optimum beta log(pi/pi_ref) = r(x, y) - alpha |y| - beta log Z(x); so the Bradley-Terry
            reward is r = beta log(pi/pi_ref) + alpha |y| + const, and the sign is +alpha |y_w|
            -alpha |y_l|. A pair whose chosen answer is longer is partly explained by its length
            already: its loss and gradient are smaller, the implicit reward (the policy) is pushed
            less toward length; a pair whose chosen answer is shorter is pushed more.
        simpo_gamma: SimPO's target margin gamma (None: beta / 2, the authors' gamma/beta = 0.5).

    Returns:
        losses: (B,) loss per pair (the caller averages).
        chosen_rewards: (B,) beta * (policy - reference) log-ratio of the chosen answers, detached;
            without a reference (``simpo``, ``sft``) beta * log pi (per token for ``simpo``), as
            TRL's CPOTrainer logs them.
        rejected_rewards: (B,) same for the rejected answers.
    """
    chosen_rewards, rejected_rewards = implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
        (chosen_lengths, rejected_lengths) if loss_type == "simpo" else None)
    if loss_type == "simpo":
        gamma = beta / 2 if simpo_gamma is None else simpo_gamma
        logits = policy_chosen_logps / _needed(chosen_lengths, "simpo") \
            - policy_rejected_logps / _needed(rejected_lengths, "simpo") - gamma / beta  # (B,)
        return _smoothed_sigmoid(beta * logits, label_smoothing), chosen_rewards, rejected_rewards
    if loss_type == "sft":
        nll = chosen_nll(policy_chosen_logps, _needed(chosen_lengths, "sft"))
        return nll.expand(policy_chosen_logps.shape[0]), chosen_rewards, rejected_rewards
    if reference_chosen_logps is None or reference_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs the reference log-probs")

    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    chosen_scores = f_divergence_score(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)  # (B,)
    rejected_scores = f_divergence_score(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)  # (B,)
    logits = chosen_scores - rejected_scores  # (B,) h in the papers

    if loss_type == "sigmoid":
        if rdpo_alpha:
            length_margin = _needed(chosen_lengths, "R-DPO") - _needed(rejected_lengths, "R-DPO")  # (B,)
            losses = _smoothed_sigmoid(beta * logits + rdpo_alpha * length_margin, label_smoothing)
        else:
            losses = _smoothed_sigmoid(beta * logits, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type in ("ipo", "sigmoid_norm"):
        chosen_norm = chosen_scores / _needed(chosen_lengths, loss_type).clamp(min=1.0)
        rejected_norm = rejected_scores / _needed(rejected_lengths, loss_type).clamp(min=1.0)
        per_token_logits = chosen_norm - rejected_norm  # (B,)
        if loss_type == "ipo":
            losses = (per_token_logits - 1 / (2 * beta)) ** 2
        else:
            losses = -F.logsigmoid(beta * per_token_logits)
    elif loss_type == "exo_pair":
        epsilon = torch.tensor(label_smoothing, device=logits.device)
        losses = (torch.sigmoid(beta * logits) * (F.logsigmoid(beta * logits) - torch.log1p(-epsilon))
                  + torch.sigmoid(-beta * logits) * (F.logsigmoid(-beta * logits) - torch.log(epsilon)))
    elif loss_type == "nca_pair":
        chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
        flipped = -label_smoothing * F.logsigmoid(-beta * logits)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type == "aot":
        policy_sorted = torch.sort(policy_chosen_logps - policy_rejected_logps).values  # (B,)
        reference_sorted = torch.sort(reference_chosen_logps - reference_rejected_logps).values  # (B,)
        losses = _smoothed_sigmoid(beta * (policy_sorted - reference_sorted), label_smoothing)
    elif loss_type == "aot_unpaired":
        delta = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values  # (B,)
        losses = _smoothed_sigmoid(beta * delta, label_smoothing)
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    elif loss_type == "discopop":
        z = beta * logits
        modulation = torch.sigmoid(z / discopop_tau)
        losses = -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z) * modulation
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, chosen_rewards, rejected_rewards


def pair_losses(
    policy: AnswerLogps,
    reference: AnswerLogps | None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    loss_terms: list[tuple[str, float]],
    beta: float,
    label_smoothing: float = 0.0,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    **options: float | str | None,
) -> dict[str, torch.Tensor]:
    """The whole objective per pair: weighted loss terms (MPO-style mixes, RPO), LD-DPO, WPO.

    Its mean over a batch is TRL 1.16's loss, sum_k w_k mean(l_k * wpo): the WPO weight multiplies
    every term, so it multiplies their sum.

    Args:
        policy: (B,) tensors ``chosen_logps``, ``rejected_logps``; with ``ld_alpha`` also
            ``chosen_tail_logps`` / ``rejected_tail_logps`` (the part of each sum beyond the pair's
            shared length min(|y_w|, |y_l|)); with ``use_weighting`` also ``chosen_aligned_logps`` /
            ``rejected_aligned_logps`` (:func:`wpo_weights`).
        reference: the same (B,) tensors under the reference (tails with ``ld_alpha``), or None
            when every term is reference-free.
        chosen_lengths: (B,) answer tokens of each chosen answer.
        rejected_lengths: (B,) same for the rejected answers.
        loss_terms: ``[(loss type, weight), ...]``.
        beta, label_smoothing, options: as :func:`preference_loss` takes them.
        ld_alpha: LD-DPO (arXiv 2409.06411): each summed log-prob becomes
            shared + ld_alpha * tail (:func:`ld_logps`); TRL's ``sft`` term keeps the plain sum.
        use_weighting: WPO (arXiv 2406.11827, Eq. 2): each pair's loss times :func:`wpo_weights`.

    Returns: ``losses`` (B,), ``chosen_rewards`` / ``rejected_rewards`` (B,), ``policy_chosen_logps`` /
        ``policy_rejected_logps`` (B,) as the loss read them (LD-weighted with ``ld_alpha``).
    """
    chosen, rejected = policy["chosen_logps"], policy["rejected_logps"]  # (B,), (B,)
    ref_chosen = ref_rejected = None
    if reference is not None:
        ref_chosen, ref_rejected = reference["chosen_logps"], reference["rejected_logps"]
    if ld_alpha is not None:
        chosen = ld_logps(chosen, policy["chosen_tail_logps"], ld_alpha)
        rejected = ld_logps(rejected, policy["rejected_tail_logps"], ld_alpha)
        if reference is not None:
            ref_chosen = ld_logps(ref_chosen, reference["chosen_tail_logps"], ld_alpha)
            ref_rejected = ld_logps(ref_rejected, reference["rejected_tail_logps"], ld_alpha)
    losses = torch.zeros_like(chosen)
    for loss_type, weight in loss_terms:
        # TRL's sft term reads the per-token log-probs as they are, without LD-DPO's weighting.
        term_chosen = policy["chosen_logps"] if loss_type == "sft" else chosen
        term, _, _ = preference_loss(term_chosen, rejected, ref_chosen, ref_rejected, beta, loss_type,
                                     label_smoothing, chosen_lengths, rejected_lengths, **options)
        losses = losses + weight * term
    if use_weighting:
        losses = losses * wpo_weights(policy["chosen_aligned_logps"], policy["rejected_aligned_logps"],
                                      chosen_lengths, rejected_lengths)
    simpo = reference is None and any(loss_type == "simpo" for loss_type, _ in loss_terms)
    chosen_rewards, rejected_rewards = implicit_rewards(
        chosen, rejected, ref_chosen, ref_rejected, beta, (chosen_lengths, rejected_lengths) if simpo else None)
    return {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "policy_chosen_logps": chosen.detach(), "policy_rejected_logps": rejected.detach()}


def implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    beta: float,
    per_token_lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) detached rewards of chosen and rejected: beta * (log pi - log pi_ref) with a reference,
    else beta * log pi (divided by the answer length when ``per_token_lengths`` (chosen (B,),
    rejected (B,)) is given: SimPO's reward). The reward margin is chosen minus rejected."""
    chosen, rejected = policy_chosen_logps.detach(), policy_rejected_logps.detach()
    if reference_chosen_logps is not None and reference_rejected_logps is not None:
        return beta * (chosen - reference_chosen_logps), beta * (rejected - reference_rejected_logps)
    if per_token_lengths is not None:
        return beta * chosen / per_token_lengths[0], beta * rejected / per_token_lengths[1]
    return beta * chosen, beta * rejected


def f_divergence_score(logratios: torch.Tensor, f_divergence_type: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(pi/pi_ref) of f-DPO (arXiv 2309.16240, Table 1) from the (B,) log-ratios u = log(pi/pi_ref).

    ``reverse_kl``: u (DPO). ``forward_kl``: 1 - exp(-u). ``js_divergence``: log 2 + log sigma(u).
    ``alpha_divergence``: (exp((alpha - 1) u) - 1) / (alpha - 1) (u at alpha = 1), the exponent
    clamped at 80 as TRL 1.16 does so exp stays finite.
    """
    if f_divergence_type == "reverse_kl" or (f_divergence_type == "alpha_divergence" and abs(alpha - 1) < 1e-6):
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0}.get(logratios.dtype, 80.0)
        exponent = torch.clamp(((alpha - 1) * logratios).float(), max=clamp_max)
        return (torch.exp(exponent) - 1).to(logratios.dtype) / (alpha - 1)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")


def ld_logps(logps: torch.Tensor, tail_logps: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's (arXiv 2409.06411) desensitised log-prob: shared + ld_alpha * tail, where the tail
    is the sum over an answer's tokens beyond min(|y_w|, |y_l|) (zero for the shorter answer).

    Args: logps (B,) the full sums; tail_logps (B,) their tail parts; ld_alpha in [0, 1].
    Returns: (B,) logps - (1 - ld_alpha) * tail_logps.
    """
    return logps - (1 - ld_alpha) * tail_logps


def wpo_weights(
    chosen_aligned_logps: torch.Tensor,
    rejected_aligned_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> torch.Tensor:
    """WPO's (arXiv 2406.11827, Eq. 2) pair weight, as TRL 1.16 computes it (no gradient).

    Each answer's weight is exp of its mean over tokens of log p(y_t) - log sum_v p(v)^2: the
    token's probability relative to the policy's own sampling distribution at that step (so a
    confident policy's answers do not all get weight ~1 and uncertain ones ~0).

    Args:
        chosen_aligned_logps: (B,) sum over the chosen answer's tokens of log p(y_t) - log sum_v p(v)^2.
        rejected_aligned_logps: (B,) same for the rejected answer.
        chosen_lengths, rejected_lengths: (B,) answer tokens.

    Returns: (B,) exp(mean_w) * exp(mean_l), detached.
    """
    chosen = chosen_aligned_logps.detach() / chosen_lengths.clamp(min=1)
    rejected = rejected_aligned_logps.detach() / rejected_lengths.clamp(min=1)
    return torch.exp(chosen) * torch.exp(rejected)


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


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(B,) -log sigma(z) (1 - eps) - log sigma(-z) eps: DPO's loss with labels flipped w.p. eps."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def _needed(lengths: torch.Tensor | None, what: str) -> torch.Tensor:
    if lengths is None:
        raise ValueError(f"{what} needs chosen_lengths and rejected_lengths")
    return lengths
