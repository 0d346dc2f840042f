"""Held-out pair metrics: eval loss, reward accuracy and margin, chosen/rejected log-probs of the
policy against the reference, and the length-controlled metrics - the same numbers (TRL names)
training logs, recomputed from the saved model so any finished run (or an export's source run) can
be scored again."""

from __future__ import annotations

import logging
from typing import Any

import torch

from dpolab.config import TrainConfig
from dpolab.data import LENGTH_COLUMNS, prepare_data
from dpolab.scoring.collate import PreferenceCollator
from dpolab.scoring.length import length_metrics
from dpolab.scoring.loss import preference_loss, preference_metrics
from dpolab.scoring.pairs import score_pairs

logger = logging.getLogger(__name__)


def pair_metrics(policy: torch.nn.Module, reference: torch.nn.Module, eval_dataset, config: TrainConfig,
                 pad_token_id: int, packed: bool) -> dict[str, Any]:
    """Metrics of ``policy`` vs ``reference`` on ``eval_dataset`` (tokenized held-out pairs), scored
    in packed or padded batches."""
    collate = PreferenceCollator(pad_token_id, packed=packed)

    def scores(model: torch.nn.Module, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        return score_pairs(model, eval_dataset, collate, config.per_device_eval_batch_size, config.logps_chunk_size,
                           desc=desc)

    ref_chosen, ref_rejected = scores(reference, "reference")
    pol_chosen, pol_rejected = scores(policy, "policy")
    lengths = {f"{side}_lengths": torch.tensor([len(ids) for ids in eval_dataset[f"{side}_ids"]], dtype=torch.float32)
               for side in ("chosen", "rejected")}  # (B,) answer tokens, for IPO
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta=config.beta, loss_type=config.loss_type,
        label_smoothing=config.label_smoothing, **lengths)
    metrics = preference_metrics(losses, chosen_rewards, rejected_rewards, pol_chosen, pol_rejected)
    metrics.update({
        "logps/ref_chosen": ref_chosen.mean().item(),
        "logps/ref_rejected": ref_rejected.mean().item(),
        # How far the policy moved each answer's log-prob from the reference (nats, mean per pair).
        "logps/chosen_minus_ref": (pol_chosen - ref_chosen).mean().item(),
        "logps/rejected_minus_ref": (pol_rejected - ref_rejected).mean().item(),
        "pairs": len(eval_dataset),
    })
    metrics.update(length_metrics(chosen_rewards - rejected_rewards,
                                  **{key: torch.tensor(eval_dataset[key]) for key in LENGTH_COLUMNS}))
    return metrics


def held_out_pairs(config: TrainConfig, tokenizer) -> tuple[Any, str]:
    """The run's own held-out split (same seed, fraction and limits as training; from the data
    cache) and its data key (to check against the run's record)."""
    datasets, _, data_key = prepare_data(config, tokenizer)
    return datasets["eval"], data_key
