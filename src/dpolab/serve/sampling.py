"""Next-token choice for a batch of sequences, each with its own sampling settings.

The order and the rules are ``transformers``' logits processors for ``generate`` (repetition
penalty, then temperature, top-k, top-p), applied row by row with per-row parameters, so one
decode step can serve greedy and sampled requests side by side. Each row draws from its own
``torch.Generator``: a seeded request samples the same tokens whoever else shares its batch.
"""

from __future__ import annotations

import torch

from dpolab.serve.validation import SamplingParams


def repetition_penalty(logits: torch.Tensor, seen: list[torch.Tensor], penalties: list[float]) -> torch.Tensor:
    """CTRL's penalty (HF ``RepetitionPenaltyLogitsProcessor``): every token already in the row (prompt
    included) has its logit divided by the penalty if positive, multiplied if negative. logits: (B, V)."""
    for row, (ids, penalty) in enumerate(zip(seen, penalties, strict=True)):
        if penalty != 1.0:
            scores = logits[row].gather(0, ids)  # (n,)
            logits[row].scatter_(0, ids, torch.where(scores < 0, scores * penalty, scores / penalty))
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p exclude, per row. logits: (B, V); top_k: (B,) with 0 = off;
    top_p: (B,) with 1 = off. The most likely token always survives."""
    ordered, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(logits.shape[-1], device=logits.device)  # (V,)
    drop = (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None])  # (B, V) in sorted order
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop |= (before >= top_p[:, None]) & (top_p[:, None] < 1)
    drop[:, 0] = False
    return logits.scatter(1, order, ordered.masked_fill(drop, float("-inf")))


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], seen: list[torch.Tensor],
                generators: list[torch.Generator]) -> list[int]:
    """One token per row. logits: (B, V) float32; seen[i]: row i's ids so far (prompt + answer)."""
    logits = repetition_penalty(logits, seen, [p.repetition_penalty for p in params])
    greedy = logits.argmax(dim=-1).tolist()  # (B,)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return greedy
    rows = logits[sampled] / torch.tensor([params[i].temperature for i in sampled])[:, None]  # (S, V)
    rows = filter_top_k_top_p(rows, torch.tensor([params[i].top_k for i in sampled]),
                              torch.tensor([params[i].top_p for i in sampled]))
    probs = rows.softmax(dim=-1)  # (S, V)
    for j, i in enumerate(sampled):
        greedy[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]))
    return greedy


def generator_for(params: SamplingParams) -> torch.Generator:
    """The row's random stream: ``params.seed`` when given, fresh entropy otherwise."""
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator
