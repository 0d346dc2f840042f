"""How to batch decoding on a CPU, measured in one process: a busy server's case, 8 chat prompts x 32
greedy new tokens on GPT-2 124M, decoded four ways.

    python benchmarks/decode_batching.py --model gpt2-124m-random --repeats 3

* ``sequential``: one ``model.generate`` per prompt (what `dpolab serve` did before batching);
* ``padded_generate``: the 8 prompts as one left-padded ``generate`` batch (a static batch);
* ``hf_continuous``: ``transformers``' continuous batching, ``model.generate_batch``;
* ``dpolab_batcher``: :class:`dpolab.serve.batching.Batcher`, 8 threads submitting at once (what
  the server runs: per-row prefill, then shared decode steps).

Variants alternate inside each round; tokens/s = 8 x 32 / wall time, medians over rounds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from common import machine_info, publish, rotated, summarize

logger = logging.getLogger("decode_batching")

VARIANTS = ["sequential", "padded_generate", "hf_continuous", "dpolab_batcher"]


def prompts(tokenizer: Any, n: int) -> list[list[int]]:
    from serve_load import QUESTIONS

    return [tokenizer(f"\n\nHuman: {QUESTIONS[i % len(QUESTIONS)]}\n\nAssistant:").input_ids for i in range(n)]


@torch.inference_mode()
def decode(variant: str, model: Any, ids: list[list[int]], new_tokens: int) -> int:
    """Generate ``new_tokens`` greedy tokens for every prompt; returns the tokens generated."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=50256, eos_token_id=50256)
    if variant == "sequential":
        for prompt in ids:
            x = torch.tensor([prompt])
            model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    elif variant == "padded_generate":
        width = max(map(len, ids))
        x = torch.tensor([[50256] * (width - len(p)) + p for p in ids])  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        model.generate(x, attention_mask=mask, generation_config=config)
    elif variant == "hf_continuous":
        from transformers import ContinuousBatchingConfig

        # Sized for this workload: left to itself it reserves most free RAM for its paged cache.
        cb_config = ContinuousBatchingConfig(num_blocks=2 * len(ids), max_batch_tokens=512,
                                             max_requests_per_batch=len(ids))
        model.generate_batch(ids, generation_config=config, continuous_batching_config=cb_config,
                             progress_bar=False)
    else:
        from dpolab.serve.batching import Batcher
        from dpolab.serve.validation import SamplingParams

        params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, repetition_penalty=1.0)
        batcher = Batcher(model, "bench")
        threads = [threading.Thread(target=batcher.generate, args=(p, params, lambda t: False, lambda: False))
                   for p in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        batcher.close()
    return len(ids) * new_tokens


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dpolab.generate import load_for_generation
    from dpolab.model import load_tokenizer

    model = load_for_generation(args.model, args.precision)
    ids = prompts(load_tokenizer(args.model), args.prompts)
    for variant in args.variants:  # warm-up
        decode(variant, model, ids[:2], 2)
    samples: dict[str, list[float]] = {v: [] for v in args.variants}
    for rnd in range(args.repeats):
        for variant in rotated(args.variants, rnd):
            start = time.perf_counter()
            tokens = decode(variant, model, ids, args.new_tokens)
            samples[variant].append(tokens / (time.perf_counter() - start))
            logger.info("round %d %s: %.1f tokens/s", rnd, variant, samples[variant][-1])
    results = {v: {"tokens_per_s": summarize(s), "raw": s} for v, s in samples.items()}
    base = results[args.variants[0]]["tokens_per_s"]["median"]
    for entry in results.values():
        entry["ratio_to_first"] = entry["tokens_per_s"]["median"] / base
    return {"benchmark": "decode_batching", "command": " ".join(sys.argv), "machine": machine_info(),
            "model": args.model, "precision": args.precision, "prompts": args.prompts, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "results": results}


def markdown_table(data: dict[str, Any]) -> str:
    lines = [f"| variant | tokens/s median (min-max) | vs {next(iter(data['results']))} |", "|---|---|---|"]
    for variant, r in data["results"].items():
        t = r["tokens_per_s"]
        lines.append(f"| {variant} | {t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) | {r['ratio_to_first']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-124m-random")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    data = run(args)
    publish("decode_batching", data, args.out, markdown_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
