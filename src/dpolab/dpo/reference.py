"""Reference log-probs: computed once with the frozen starting model, before training, and cached.

The reference never changes, so running it at every step (TRL's default) doubles the forward
work and keeps a second model in memory. We score every pair once, store the two numbers per pair
on disk keyed by (reference weights, tokenized data), and train while holding ONE model. A second
run on the same data and reference - every trial of a sweep - reads the cache.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from datasets import DatasetDict

from dpolab.errors import ConfigError
from dpolab.model import load_frozen, weights_fingerprint
from dpolab.scoring.collate import PreferenceCollator
from dpolab.scoring.pairs import score_pair_stats

logger = logging.getLogger(__name__)


def load_reference(name: str, policy: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """A separate frozen reference (``ref_model``), prepared exactly as the policy is when it is its
    own reference. It scores the same token ids, so its vocabulary must be the policy's."""
    reference = load_frozen(name, device, next(policy.parameters()).dtype)
    if reference.config.vocab_size != policy.config.vocab_size:
        raise ConfigError(f"ref_model {name}: vocabulary of {reference.config.vocab_size} tokens, but the policy's "
                          f"has {policy.config.vocab_size}; the reference must share the policy's tokenizer")
    return reference


def add_reference_logps(
    model: torch.nn.Module,
    datasets: DatasetDict,
    data_key: str,
    cache_dir: Path,
    collate: PreferenceCollator,
    batch_size: int,
    chunk_size: int,
    tails: bool = False,
) -> tuple[DatasetDict, dict[str, object]]:
    """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, from the cache when possible; with
    ``tails`` (LD-DPO) also ``ref_chosen_tail_logps`` / ``ref_rejected_tail_logps``, the part of each
    sum beyond the pair's shared length (cached in a file of their own: plain runs keep theirs).

    Returns the datasets and ``{"reference_cache": "hit"|"miss", "reference_time_s": float,
    "reference_key": str}`` for the run summary.
    """
    key = f"{weights_fingerprint(model)}-{data_key}"
    path = cache_dir / "reference" / f"{key}{'-tails' if tails else ''}.pt"
    columns = ["chosen_logps", "rejected_logps", *(["chosen_tail_logps", "rejected_tail_logps"] if tails else [])]
    start = time.perf_counter()
    if path.exists():
        cached = torch.load(path)
        status = "hit"
        logger.info("reference log-probs: cache hit %s (reference pass skipped)", path)
    else:
        logger.info("reference log-probs: computing once with the frozen reference (cache miss)")
        cached = {}
        for split, ds in datasets.items():
            scores = score_pair_stats(model, ds, collate, batch_size, chunk_size, desc=split, tails=tails)
            cached[split] = tuple(scores[column] for column in columns)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save(cached, tmp)
        os.replace(tmp, path)  # atomic: parallel sweep workers may race here
        status = "miss"
    elapsed = time.perf_counter() - start
    out = DatasetDict()
    for split, ds in datasets.items():
        for column, values in zip(columns, cached[split], strict=True):
            ds = ds.add_column(f"ref_{column}", values.tolist())
        out[split] = ds
    return out, {"reference_cache": status, "reference_time_s": round(elapsed, 3), "reference_key": key}
