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
from dpolab.scoring.loss import pair_losses, preference_metrics
from dpolab.scoring.pairs import score_pair_stats

logger = logging.getLogger(__name__)


def pair_metrics(policy: torch.nn.Module, reference: torch.nn.Module | None, eval_dataset, config: TrainConfig,
                 pad_token_id: int, packed: bool) -> dict[str, Any]:
    """Metrics of ``policy`` vs ``reference`` on ``eval_dataset`` (tokenized held-out pairs), scored
    in packed or padded batches, under the config's loss (every option training has). ``reference``
    is not scored (and may be None) when the loss is reference-free. The pairs form one batch for
    the batch-level terms (``sft``'s token mean, ``aot``'s sorting), as TRL's evaluation does when
    they fit one eval batch."""
    collate = PreferenceCollator(pad_token_id, packed=packed)

    def scores(model: torch.nn.Module, desc: str, aligned: bool = False) -> dict[str, torch.Tensor]:
        return score_pair_stats(model, eval_dataset, collate, config.per_device_eval_batch_size,
                                config.logps_chunk_size, desc=desc, tails=config.ld_alpha is not None, aligned=aligned)

    ref = None if config.reference_free else scores(reference, "reference")
    pol = scores(policy, "policy", aligned=config.use_weighting)
    lengths = {f"{side}_lengths": torch.tensor([len(ids) for ids in eval_dataset[f"{side}_ids"]], dtype=torch.float32)
               for side in ("chosen", "rejected")}  # (B,) answer tokens
    out = pair_losses(pol, ref, **lengths, **config.loss_options())
    metrics = preference_metrics(out["losses"], out["chosen_rewards"], out["rejected_rewards"],
                                 out["policy_chosen_logps"], out["policy_rejected_logps"])
    if ref is None:
        metrics["reference_free"] = True
    else:
        ref_chosen, ref_rejected = ref["chosen_logps"], ref["rejected_logps"]
        pol_chosen, pol_rejected = pol["chosen_logps"], pol["rejected_logps"]
        metrics.update({
            "logps/ref_chosen": ref_chosen.mean().item(),
            "logps/ref_rejected": ref_rejected.mean().item(),
            # How far the policy moved each answer's log-prob from the reference (nats, mean per pair).
            "logps/chosen_minus_ref": (pol_chosen - ref_chosen).mean().item(),
            "logps/rejected_minus_ref": (pol_rejected - ref_rejected).mean().item(),
        })
    metrics["pairs"] = len(eval_dataset)
    metrics.update(length_metrics(out["chosen_rewards"] - out["rejected_rewards"],
                                  **{key: torch.tensor(eval_dataset[key]) for key in LENGTH_COLUMNS}))
    return metrics


def held_out_pairs(config: TrainConfig, tokenizer) -> tuple[Any, str]:
    """The run's own held-out split (same seed, fraction and limits as training; from the data
    cache) and its data key (to check against the run's record)."""
    datasets, _, data_key = prepare_data(config, tokenizer)
    return datasets["eval"], data_key
