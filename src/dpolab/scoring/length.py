"""Length-controlled evaluation: how much of a reward accuracy the answers' lengths explain.

DPO is known to learn length: the longer answer gets the higher implicit reward whether or not it is
better (Park et al. 2024, arXiv 2403.19159; Singhal et al. 2023, arXiv 2310.03716). Reward accuracy
alone cannot tell a model that learned the data's preferences from one that learned "longer wins",
so :func:`length_metrics` puts it beside:

* the length-only baseline ``length/chosen_longer``: the share of pairs whose chosen answer has
  more tokens (a tie counts half), i.e. the accuracy of always preferring the longer answer;
* reward accuracy inside length strata of d = chosen tokens - rejected tokens (d > 0, d < 0,
  |d| <= 5) and their length-balanced mean, which a pure length judge scores 0.5 on whatever data;
* Spearman's rho between margin and d, and the accuracy of the margin's residual after a
  least-squares fit a + b d (the part of the margin that length does not explain);
* a seeded 95% percentile-bootstrap interval (pairs resampled) for every accuracy.

One function, used by training's evaluation (``DpolabTrainer.log``) and ``dpolab evaluate``, so the
two report the same numbers for the same margins.
"""

from __future__ import annotations

import torch

SIMILAR_TOKENS = 5  # |d| <= this: the two answers are of similar length
RESAMPLES = 1000  # bootstrap resamples over pairs
CHUNK_ELEMENTS = 1 << 22  # resamples x pairs per bootstrap chunk (bounded memory on large eval sets)
STRATA = ("chosen_longer", "chosen_shorter", "similar_length")

# The accuracies, all computed by _accuracies() on the pairs and on each bootstrap resample.
ACCURACIES = ("rewards/accuracies", "length/chosen_longer", "rewards/accuracies_chosen_longer",
              "rewards/accuracies_chosen_shorter", "rewards/accuracies_similar_length",
              "rewards/accuracies_length_balanced", "rewards/accuracies_length_residual")


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x`` (N,), tied values sharing the mean of their ranks (as Spearman needs)."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.double()
    return (counts.cumsum(0) - (counts - 1) / 2)[inverse]  # (N,) a group's last rank minus half its extra members


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rho of ``x`` and ``y`` (N,): the Pearson correlation of their tie-averaged ranks.
    None when either is constant (no ranking to correlate)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return None if denominator == 0 else float((rx * ry).sum() / denominator)


def _share(hit: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Per row: share of ``among`` pairs that ``hit`` (R, N) bool; NaN where a row has none of them."""
    return (hit & among).sum(-1).double() / among.sum(-1).double()  # (R,) 0/0 = NaN


def _accuracies(margins: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every accuracy of ``ACCURACIES`` per row of (R, N) margins and length differences (float64)."""
    correct = margins > 0  # (R, N)
    every = torch.ones_like(correct)
    longer, shorter = d > 0, d < 0
    out = {
        "rewards/accuracies": correct.double().mean(-1),
        "length/chosen_longer": (longer.double() + 0.5 * (d == 0).double()).mean(-1),
        "rewards/accuracies_chosen_longer": _share(correct, longer),
        "rewards/accuracies_chosen_shorter": _share(correct, shorter),
        "rewards/accuracies_similar_length": _share(correct, d.abs() <= SIMILAR_TOKENS),
    }
    out["rewards/accuracies_length_balanced"] = (out["rewards/accuracies_chosen_longer"]
                                                 + out["rewards/accuracies_chosen_shorter"]) / 2
    # Least squares margin ~ a + b d per row; b = 0 when d is constant (the fit is then the mean).
    d_centred = d - d.mean(-1, keepdim=True)  # (R, N)
    m_centred = margins - margins.mean(-1, keepdim=True)  # (R, N)
    spread = d_centred.square().sum(-1, keepdim=True)  # (R, 1)
    slope = torch.where(spread > 0, (d_centred * m_centred).sum(-1, keepdim=True) / spread, 0.0)  # (R, 1)
    residual = m_centred - slope * d_centred  # (R, N) margin - (a + b d)
    out["rewards/accuracies_length_residual"] = _share(residual > 0, every)
    return out


def bootstrap_intervals(margins: torch.Tensor, d: torch.Tensor, seed: int = 0, resamples: int = RESAMPLES,
                        level: float = 0.95) -> dict[str, tuple[float, float] | None]:
    """Percentile-bootstrap ``level`` interval of every accuracy: ``resamples`` resamples of the N
    pairs with replacement (seeded), the statistic recomputed on each (the residual fit included).
    A resample without pairs in a stratum does not count for that stratum; None when none has any.

    The pairs are put in a canonical order first, so the interval depends on the pairs, not on the
    order they were evaluated in (training's evaluation and ``dpolab evaluate`` agree).
    """
    order = torch.argsort(margins, stable=True)
    order = order[torch.argsort(d[order], stable=True)]  # by d, then by margin
    margins, d = margins[order], d[order]
    n = len(margins)
    generator = torch.Generator().manual_seed(seed)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in ACCURACIES}
    chunk = max(1, CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, resamples, chunk):
        index = torch.randint(n, (min(chunk, resamples - start), n), generator=generator)  # (R, N)
        for name, value in _accuracies(margins[index], d[index]).items():
            values[name].append(value)
    tails = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out: dict[str, tuple[float, float] | None] = {}
    for name, parts in values.items():
        low, high = torch.nanquantile(torch.cat(parts), tails).tolist()
        out[name] = None if low != low else (low, high)  # NaN: no resample had pairs in the stratum
    return out


def pair_records(margins: torch.Tensor, lengths: dict[str, torch.Tensor]) -> list[dict[str, float | int]]:
    """One record per pair, in order: its margin and its answers' lengths (``lengths``: the four
    (N,) tensors of :func:`length_metrics`, by name). What ``eval_pairs.jsonl`` holds."""
    columns = {"margin": margins.double().tolist()}
    columns.update({name: [int(x) for x in values.tolist()] for name, values in lengths.items()})
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def length_metrics(margins: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                   chosen_chars: torch.Tensor, rejected_chars: torch.Tensor, seed: int = 0,
                   resamples: int = RESAMPLES) -> dict[str, float | int]:
    """Length-controlled metrics of N evaluated pairs (module docstring).

    Args:
        margins: (N,) reward margin per pair, chosen reward - rejected reward.
        chosen_tokens: (N,) tokens of each chosen answer as trained (an appended EOS not counted).
        rejected_tokens: (N,) same for the rejected answers.
        chosen_chars: (N,) characters of each chosen answer's text.
        rejected_chars: (N,) same for the rejected answers.
        seed: seed of the bootstrap resamples.
        resamples: bootstrap resamples (1,000 by default).

    Returns: means ``length/{chosen,rejected}_{tokens,chars}``; the accuracies of ``ACCURACIES``, each
    with ``<name>_ci_low`` / ``<name>_ci_high``; pairs per stratum ``length/pairs_<stratum>``;
    ``length/margin_spearman``. An accuracy (or rho) that is undefined on these pairs - a stratum
    without pairs, a constant margin - is left out rather than reported as NaN.
    """
    margins = margins.detach().double().cpu()
    d = (chosen_tokens.double() - rejected_tokens.double()).cpu()  # (N,)
    out: dict[str, float | int] = {
        "length/chosen_tokens": chosen_tokens.double().mean().item(),
        "length/rejected_tokens": rejected_tokens.double().mean().item(),
        "length/chosen_chars": chosen_chars.double().mean().item(),
        "length/rejected_chars": rejected_chars.double().mean().item(),
        "length/pairs_chosen_longer": int((d > 0).sum()),
        "length/pairs_chosen_shorter": int((d < 0).sum()),
        "length/pairs_similar_length": int((d.abs() <= SIMILAR_TOKENS).sum()),
    }
    rho = spearman(margins, d)
    if rho is not None:
        out["length/margin_spearman"] = rho
    intervals = bootstrap_intervals(margins, d, seed=seed, resamples=resamples)
    for name, value in _accuracies(margins[None], d[None]).items():
        value = value.item()
        if value != value:  # NaN: no pairs in this stratum
            continue
        out[name] = value
        if intervals[name] is not None:
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = intervals[name]
    return out
