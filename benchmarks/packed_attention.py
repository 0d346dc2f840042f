"""Attention cost of packed rows vs padded sequences: how long a packed row may be.

    python benchmarks/packed_attention.py --pairs 8 --repeats 5

A packed row attends through a dense block-diagonal mask, so its attention costs (row length)^2
whatever the sequences inside it; padded sequences cost (batch x longest^2). This times GPT-2 124M's
attention (12 heads of 64, ``scaled_dot_product_attention`` forward + backward, one layer) on the
sequences of real HH-RLHF pairs (bundled sample, max_length 512, a seeded random batch), laid out
by dpolab's own collator: padded, and packed into rows of several mean lengths
(``PreferenceCollator.row_tokens``; dpolab uses ``PACKED_ROW_TOKENS``). Medians of ``--repeats``,
after one warm-up.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import machine_info, publish, summarize

if TYPE_CHECKING:
    import torch

HEADS, HEAD_DIM = 12, 64  # GPT-2 124M


def attention_seconds(mask: torch.Tensor, repeats: int) -> list[float]:
    """Forward + backward of SDPA over (R, 12, L, 64) under ``mask`` (R, 1, L, L); seconds per repeat."""
    import torch

    rows, length = mask.shape[0], mask.shape[-1]
    q, k, v = (torch.randn(rows, HEADS, length, HEAD_DIM, requires_grad=True) for _ in range(3))
    times = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
        if repeat:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return times


def segment_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What transformers builds for either layout: causal, within one sequence, real tokens only."""
    import torch

    index = batch["sequence_index"]  # (R, L), -1 at padding / filler
    length = index.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (index[:, :, None] == index[:, None, :]) & (index[:, None, :] >= 0)  # (R, L, L)
    return (same & causal)[:, None]  # (R, 1, L, L)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per batch (2x as many sequences)")
    parser.add_argument("--caps", type=int, nargs="+", default=[512, 1024, 2048, 100_000],
                        help="PreferenceCollator.row_tokens values: ceil(tokens / row_tokens) balanced rows "
                        "(100000: everything in one row)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from dpolab.config import TrainConfig
    from dpolab.data import prepare_data
    from dpolab.model import load_tokenizer
    from dpolab.scoring.collate import PACKED_ROW_TOKENS, PreferenceCollator

    config = TrainConfig(model="tiny-gpt2", max_length=args.max_length, max_prompt_length=args.max_length // 2,
                         max_eval_pairs=1, cache_dir=tempfile.mkdtemp(prefix="dpolab-bench-"))
    tokenizer = load_tokenizer(config.model)
    pairs = prepare_data(config, tokenizer)[0]["train"]
    chosen = random.Random(0).sample(range(len(pairs)), args.pairs)
    examples = [pairs[i] for i in chosen]
    layouts = {"padded": PreferenceCollator(tokenizer.pad_token_id)(examples)}
    for cap in args.caps:
        layouts[f"packed, row_tokens {cap}"] = PreferenceCollator(tokenizer.pad_token_id, packed=True,
                                                               row_tokens=cap)(examples)
    results = {}
    for name, batch in layouts.items():
        mask = segment_mask(batch)
        results[name] = {"rows": mask.shape[0], "row_length": mask.shape[-1],
                         "seconds": summarize(attention_seconds(mask, args.repeats))}
    padded_s = results["padded"]["seconds"]["median"]
    lines = ["| layout | rows x length | fwd+bwd ms median (min-max) | vs padded |", "|---|---|---|---|"]
    for name, result in results.items():
        seconds = result["seconds"]
        result["vs_padded"] = seconds["median"] / padded_s
        lines.append(f"| {name} | {result['rows']} x {result['row_length']} | {seconds['median'] * 1e3:.0f} "
                     f"({seconds['min'] * 1e3:.0f}-{seconds['max'] * 1e3:.0f}) | {result['vs_padded']:.2f}x |")
    data = {"benchmark": "packed_attention", "pairs": args.pairs, "heads": HEADS, "head_dim": HEAD_DIM,
            "dpolab_row_tokens": PACKED_ROW_TOKENS, "real_tokens": int((layouts["padded"]["sequence_index"] >= 0).sum()),
            "results": results, "machine": machine_info()}
    publish("packed_attention", data, args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
