"""Length-controlled metrics on hand-built pairs whose answers are worked out by hand."""

import math

import pytest
import torch

from dpolab.scoring.length import average_ranks, bootstrap_intervals, length_metrics, spearman

# Eight pairs, d = chosen - rejected tokens: two each of +10, -10, +2, -2. The margin is d plus
# +1 / -1 within each pair of equal d, so the extra part sums to zero against 1 and against d:
# the least-squares fit of the margin on d is exactly 0 + 1 * d and the residuals are exactly +-1.
CHOSEN = torch.tensor([20, 20, 10, 10, 16, 16, 14, 14])
REJECTED = torch.tensor([10, 10, 20, 20, 14, 14, 16, 16])
D = (CHOSEN - REJECTED).float()
NOISE = torch.tensor([1.0, -1.0] * 4)
CHARS = (torch.tensor([100, 90, 40, 50, 70, 60, 66, 64]), torch.tensor([30, 40, 80, 90, 50, 60, 61, 59]))


def metrics(margins, chosen=CHOSEN, rejected=REJECTED, chars=CHARS, **kw):
    return length_metrics(margins, chosen, rejected, *chars, **kw)


def test_margin_that_is_the_length_difference_plus_balanced_noise():
    m = metrics(D + NOISE)  # margins 11, 9, -9, -11, 3, 1, -1, -3
    assert m["length/chosen_tokens"] == 15 and m["length/rejected_tokens"] == 15
    assert m["length/chosen_chars"] == 67.5 and m["length/rejected_chars"] == 58.75
    assert m["length/chosen_longer"] == 0.5  # the length-only baseline
    assert m["rewards/accuracies"] == 0.5
    # A margin that follows length: always right when the chosen answer is longer, always wrong
    # when it is shorter; balanced, that is chance, whatever the share of longer chosen answers.
    assert m["rewards/accuracies_chosen_longer"] == 1.0 and m["length/pairs_chosen_longer"] == 4
    assert m["rewards/accuracies_chosen_shorter"] == 0.0 and m["length/pairs_chosen_shorter"] == 4
    assert m["rewards/accuracies_length_balanced"] == 0.5
    assert m["rewards/accuracies_similar_length"] == 0.5 and m["length/pairs_similar_length"] == 4  # |d| = 2
    # Length explains everything but the +-1: half the residuals are above the fit.
    assert m["rewards/accuracies_length_residual"] == 0.5
    # Ranks: margins 8 7 2 1 6 5 4 3; d (ties averaged) 7.5 7.5 1.5 1.5 5.5 5.5 3.5 3.5 -> rho = 40 / sqrt(42 * 40).
    assert m["length/margin_spearman"] == pytest.approx(math.sqrt(20 / 21), abs=1e-12)


def test_a_margin_that_ignores_length():
    # Right on every pair but the second: residual accuracy and balanced accuracy see it.
    margins = torch.tensor([2.0, -1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 1.0])
    m = metrics(margins)
    assert m["rewards/accuracies"] == 7 / 8
    assert m["rewards/accuracies_chosen_longer"] == 3 / 4  # d > 0: pairs 0, 1, 4, 5
    assert m["rewards/accuracies_chosen_shorter"] == 1.0
    assert m["rewards/accuracies_length_balanced"] == 7 / 8
    assert m["length/margin_spearman"] < 0.5


def test_ties_count_half_and_empty_strata_are_left_out():
    chosen, rejected = torch.tensor([5, 7, 9, 9]), torch.tensor([5, 3, 2, 9])  # d = 0, 4, 7, 0
    m = metrics(torch.tensor([0.5, 1.0, -2.0, 0.0]), chosen, rejected, (chosen, rejected))
    assert m["length/chosen_longer"] == (2 + 0.5 * 2) / 4
    assert m["length/pairs_chosen_shorter"] == 0
    # No pair with a shorter chosen answer: that accuracy and the balanced mean are undefined.
    assert "rewards/accuracies_chosen_shorter" not in m and "rewards/accuracies_length_balanced" not in m
    assert m["rewards/accuracies_chosen_longer"] == 0.5
    assert m["rewards/accuracies_similar_length"] == 2 / 3  # d = 0, 4, 0: margins 0.5, 1.0, 0.0
    assert m["rewards/accuracies"] == 0.5  # a zero margin is not a correct ranking
    # A constant margin has no ranking: no rho.
    assert "length/margin_spearman" not in metrics(torch.ones(8))


def test_spearman_with_ties_by_hand():
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    # x ranks 1 2.5 2.5 4, y ranks 2 1 3.5 3.5: centred (-1.5 0 0 1.5), (-0.5 -1.5 1 1);
    # sum of products 2.25, squares 4.5 and 4.5 -> rho = 0.5.
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([5.0, 4.0, 6.0, 6.0])) == pytest.approx(0.5)
    assert spearman(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 3.0])) is None


def test_bootstrap_is_seeded_order_free_and_contains_the_estimate():
    generator = torch.Generator().manual_seed(1)
    n = 400
    d = torch.randint(-30, 31, (n,), generator=generator)
    margins = torch.randn(n, generator=generator) + 0.5 + 0.02 * d
    chosen, rejected = 100 + d.clamp(min=0), 100 - d.clamp(max=0)
    chars = (chosen * 4, rejected * 4)
    first = length_metrics(margins, chosen, rejected, *chars, seed=3)
    assert first == length_metrics(margins, chosen, rejected, *chars, seed=3)
    shuffle = torch.randperm(n, generator=generator)
    shuffled = length_metrics(margins[shuffle], chosen[shuffle], rejected[shuffle], *(c[shuffle] for c in chars), seed=3)
    assert shuffled == first  # the pairs, not their order, decide the interval
    assert length_metrics(margins, chosen, rejected, *chars, seed=4) != first
    names = [k.removesuffix("_ci_low") for k in first if k.endswith("_ci_low")]
    assert len(names) == 7
    for name in names:
        assert first[f"{name}_ci_low"] <= first[name] <= first[f"{name}_ci_high"], name
    # The plain accuracy's interval is about the normal approximation's +-1.96 standard errors.
    p = first["rewards/accuracies"]
    width = first["rewards/accuracies_ci_high"] - first["rewards/accuracies_ci_low"]
    assert width == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.2)


def test_bootstrap_of_a_perfect_score_is_a_point():
    intervals = bootstrap_intervals(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, -1.0, 9.0]), resamples=50)
    assert intervals["rewards/accuracies"] == (1.0, 1.0)
