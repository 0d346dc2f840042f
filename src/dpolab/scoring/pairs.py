"""Scoring a data set of preference pairs: summed answer log-probs of chosen and rejected, per pair."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dpolab.scoring.collate import PreferenceCollator
from dpolab.scoring.logps import concatenated_stats, sequence_logps


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


@torch.inference_mode()
def prompt_answer_logps(model: torch.nn.Module, prompt_ids: list[int], answers: list[list[int]],
                        pad_token_id: int) -> list[float]:
    """Summed log pi(answer | prompt) of each answer (token ids as training scores them:
    :func:`dpolab.data.tokenize.answer_ids`) after one prompt, as one right-padded batch.

    What the samples while training and the web app's rewards score: the same numbers the
    training loss saw for the same answer.
    """
    device = next(model.parameters()).device
    length = max(len(prompt_ids) + len(a) for a in answers)
    input_ids = torch.full((len(answers), length), pad_token_id, dtype=torch.long)  # (S, T)
    attention = torch.zeros_like(input_ids)  # (S, T)
    answer_mask = torch.zeros_like(input_ids)  # (S, T)
    for row, answer in enumerate(answers):
        sequence = prompt_ids + answer
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
        answer_mask[row, len(prompt_ids): len(sequence)] = 1
    logps = sequence_logps(model, input_ids.to(device), attention.to(device), answer_mask.to(device))  # (S,)
    return logps.tolist()
