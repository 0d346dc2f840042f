"""Generation latency: plain fp32 ``model.generate`` vs dpolab.generate's bf16 / int8 options.

    python benchmarks/generate_latency.py --model gpt2-124m-random --repeats 3
    python benchmarks/generate_latency.py --device cuda --dtype fp32 bf16     # a GPU (int8 is CPU-only)

Greedy, batch 1, a 256-token real HH-RLHF prompt. Per precision:
* time to first token (TTFT) = ``generate(max_new_tokens=1)``: the 256-token prefill + one token;
* ms/token = (time for ``--new-tokens`` tokens - TTFT) / (new_tokens - 1): the decode steps only.
Precisions alternate inside each round; medians and min-max over rounds. ``plain_fp32`` is the
model exactly as ``from_pretrained`` gives it (stock Python GELU); ``fp32`` adds the fused GELU.

Quality vs plain fp32 on held-out pairs: relative change of the mean answer-token NLL, and greedy
token agreement (share of identical tokens, position by position) over a fixed prompt set.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import cuda_sync, machine_info, publish, rotated, summarize

logger = logging.getLogger("generate_latency")

PRECISIONS = ["plain_fp32", "fp32", "bf16", "int8"]
# Bytes per parameter read per decoded token, for the bandwidth floor (an earlier estimate
# for this machine: ~33 ms/token fp32 for 124M parameters).
BYTES_PER_PARAM = {"plain_fp32": 4, "fp32": 4, "bf16": 2, "int8": 1}
FP32_FLOOR_MS_124M = 33.0


def load(model_name: str, precision: str, device: str = "cpu") -> torch.nn.Module:
    from dpolab.generate import load_for_generation
    from dpolab.model import load_model

    if precision == "plain_fp32":
        model = load_model(model_name)  # what a user gets from from_pretrained, eval mode
        model.eval()
        return model.to(device)
    return load_for_generation(model_name, precision).to(device)


def held_out(model_name: str, n_pairs: int, prompt_tokens: int) -> tuple[Any, torch.Tensor]:
    """Held-out pairs (eval split of the bundled sample) and a ``prompt_tokens``-long real prompt."""
    from dpolab.config import TrainConfig
    from dpolab.data import prepare_data
    from dpolab.model import load_tokenizer

    tokenizer = load_tokenizer(model_name)
    config = TrainConfig(model=model_name, max_train_pairs=1, max_eval_pairs=max(n_pairs, 64), seed=0,
                         cache_dir=tempfile.mkdtemp(prefix="dpolab-gen-"))
    pairs = prepare_data(config, tokenizer)[0]["eval"]
    long_prompts = [p["prompt_ids"] for p in pairs if len(p["prompt_ids"]) >= prompt_tokens]
    if long_prompts:
        prompt = long_prompts[0][-prompt_tokens:]
    else:  # concatenate prompts until long enough (only for tiny --prompt-tokens edge cases)
        ids = [t for p in pairs for t in p["prompt_ids"]]
        prompt = ids[:prompt_tokens]
    return pairs.select(range(n_pairs)), torch.tensor([prompt])


@torch.no_grad()
def timed_generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=50256, attention_mask=torch.ones_like(prompt))
    cuda_sync()
    return time.perf_counter() - start, out[0, prompt.shape[1]:]


def quality(models: dict[str, torch.nn.Module], pairs, agree_prompts: int, agree_tokens: int,
            device: str = "cpu") -> dict[str, Any]:
    """NLL of held-out answers and greedy agreement with plain fp32, per precision."""
    from dpolab.generate import answer_nll

    out: dict[str, Any] = {}
    references: list[torch.Tensor] = []
    prompts = [torch.tensor([p["prompt_ids"][-64:]], device=device) for p in pairs.select(range(agree_prompts))]
    for precision in models:
        model = models[precision]
        nll, count = 0.0, 0
        for pair in pairs:
            for answer in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([pair["prompt_ids"] + pair[answer]], device=device)
                mask = torch.tensor([[0] * len(pair["prompt_ids"]) + [1] * len(pair[answer])], device=device)
                s, n = answer_nll(model, ids, mask)
                nll, count = nll + s, count + n
        generated = [timed_generate(model, p, agree_tokens)[1] for p in prompts]
        if precision == "plain_fp32":
            references = generated
        same = sum(int((g == r).sum()) for g, r in zip(generated, references, strict=True))
        first_diff = [int((g != r).nonzero()[0]) if (g != r).any() else agree_tokens
                      for g, r in zip(generated, references, strict=True)]
        out[precision] = {"answer_nll_per_token": nll / count, "answer_tokens": count,
                          "greedy_agreement": same / (agree_tokens * len(prompts)),
                          "mean_tokens_before_first_divergence": sum(first_diff) / len(first_diff)}
    base = out["plain_fp32"]["answer_nll_per_token"]
    for entry in out.values():
        entry["nll_rel_change"] = entry["answer_nll_per_token"] / base - 1
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = ["plain_fp32", *args.dtype]
    pairs, prompt = held_out(args.model, args.quality_pairs, args.prompt_tokens)
    prompt = prompt.to(args.device)
    models = {p: load(args.model, p, args.device) for p in precisions}
    n_params = sum(p.numel() for p in models["plain_fp32"].parameters())
    for model in models.values():  # warm-up: first-call allocations, oneDNN/fbgemm/cuBLAS kernel selection
        timed_generate(model, prompt, 4)
    samples: dict[str, dict[str, list[float]]] = {p: {"ttft_s": [], "total_s": []} for p in precisions}
    for rnd in tqdm(range(args.repeats), desc="rounds"):
        for precision in rotated(precisions, rnd):
            ttft, _ = timed_generate(models[precision], prompt, 1)
            total, _ = timed_generate(models[precision], prompt, args.new_tokens)
            samples[precision]["ttft_s"].append(ttft)
            samples[precision]["total_s"].append(total)
    results: dict[str, Any] = {}
    for precision, s in samples.items():
        ms_per_token = [(t - f) / (args.new_tokens - 1) * 1e3 for t, f in zip(s["total_s"], s["ttft_s"], strict=True)]
        results[precision] = {"ms_per_token": summarize(ms_per_token),
                              "ttft_ms": summarize([x * 1e3 for x in s["ttft_s"]]),
                              "raw": s}
    plain = results["plain_fp32"]["ms_per_token"]["median"]
    for precision, entry in results.items():
        entry["speedup_vs_plain_fp32"] = plain / entry["ms_per_token"]["median"]
        # Scale the measured fp32 floor (33 ms for 124M params) by parameter count and bytes per weight.
        # That floor is this CPU's memory bandwidth: meaningless on a GPU.
        floor = FP32_FLOOR_MS_124M * n_params / 124.4e6 * BYTES_PER_PARAM[precision] / 4
        entry["bandwidth_floor_ms"] = floor if args.device == "cpu" else None
        entry["ratio_to_floor"] = entry["ms_per_token"]["median"] / floor if args.device == "cpu" else None
    info = machine_info()
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return {"benchmark": "generate_latency", "command": " ".join(sys.argv), "machine": info,
            "device": args.device, "model": args.model, "parameters": n_params,
            "prompt_tokens": int(prompt.shape[1]), "new_tokens": args.new_tokens, "repeats": args.repeats,
            "results": results, "quality": quality(models, pairs, args.agree_prompts, args.agree_tokens, args.device)}


def markdown_table(data: dict[str, Any]) -> str:
    lines = ["| precision | ms/token (min-max) | speedup vs plain fp32 | floor ms | x floor | TTFT ms (256-token "
             "prompt) | NLL change | greedy agreement |", "|---|---|---|---|---|---|---|---|"]
    for precision, r in data["results"].items():
        q = data["quality"][precision]
        m, t = r["ms_per_token"], r["ttft_ms"]
        floor, ratio = r["bandwidth_floor_ms"], r["ratio_to_floor"]
        lines.append(f"| {precision} | {m['median']:.1f} ({m['min']:.1f}-{m['max']:.1f}) | "
                     f"{r['speedup_vs_plain_fp32']:.2f}x | {f'{floor:.1f}' if floor else '-'} | "
                     f"{f'{ratio:.2f}' if ratio else '-'} | "
                     f"{t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | {q['nll_rel_change']:+.3%} | "
                     f"{q['greedy_agreement']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-124m-random")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--quality-pairs", type=int, default=8, help="held-out pairs for the NLL check")
    parser.add_argument("--agree-prompts", type=int, default=8, help="prompts for the greedy agreement check")
    parser.add_argument("--agree-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", nargs="+", choices=PRECISIONS[1:], default=None,
                        help="precisions timed against plain fp32 (default: fp32 bf16 int8; on cuda fp32 bf16)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = PRECISIONS[1:] if args.device == "cpu" else ["fp32", "bf16"]
    if args.device == "cuda" and "int8" in args.dtype:
        parser.error("--dtype int8 is CPU-only (torch.ao dynamic quantisation has no CUDA kernels)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    data = run(args)
    publish("generate_latency", data, args.out, markdown_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
