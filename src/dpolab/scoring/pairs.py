"""Scoring a data set of preference pairs: summed answer log-probs of chosen and rejected, per pair."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dpolab.scoring.collate import PreferenceCollator
from dpolab.scoring.logps import concatenated_stats


def score_pairs(
    model: torch.nn.Module, dataset, collate: PreferenceCollator, batch_size: int, chunk_size: int,
    desc: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (N,), rejected (N,)) summed answer log-probs under ``model``, in dataset order: the
    reference pass, and ``dpolab evaluate`` scoring policy and reference alike."""
    scores = score_pair_stats(model, dataset, collate, batch_size, chunk_size, desc)
    return scores["chosen_logps"], scores["rejected_logps"]


@torch.no_grad()
def score_pair_stats(
    model: torch.nn.Module, dataset, collate: PreferenceCollator, batch_size: int, chunk_size: int,
    desc: str = "reference", tails: bool = False, aligned: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-pair (N,) ``chosen_logps`` / ``rejected_logps`` under ``model`` in dataset order, and the
    extras :func:`~dpolab.scoring.logps.concatenated_stats` gives with ``tails`` (LD-DPO) and
    ``aligned`` (WPO).

    Pairs are scored in order of length so each batch pads little (or packs well), then put back in place.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = dataset["length"]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    scores: dict[str, torch.Tensor] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=f"{desc} log-probs", unit="batch"):
        indices = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([columns[i] for i in indices]).items()}
        for key, values in concatenated_stats(model, batch, chunk_size, tails, aligned).items():
            scores.setdefault(key, torch.empty(len(order), dtype=torch.float32))[indices] = values.float().cpu()
    model.train(was_training)
    return scores
