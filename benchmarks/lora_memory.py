"""Peak memory of LoRA vs full fine-tuning: the same DPO run on the GPT-2 124M architecture, with
``--lora-r`` or without, each in a fresh process (peak RSS is per process), alternating order.

    python benchmarks/lora_memory.py --repeats 2 --steps 3

LoRA keeps no gradients or AdamW moments for the frozen weights (2 x 4 bytes of moments + 4 bytes
of gradient per parameter: ~1.5 GB for 124M parameters), so its peak is lower by about that.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, publish, rotated, run_worker, summarize  # noqa: E402

VARIANTS = {"full fine-tuning": [], "LoRA r=16 (c_attn, c_proj, c_fc)": ["--lora-r", "16"]}


def worker(args: argparse.Namespace, extra: list[str]) -> None:
    from dpolab.config import load_config
    from dpolab.dpo.trainer import train

    with tempfile.TemporaryDirectory(prefix="dpolab-lora-") as tmp:
        overrides = {"model": args.model, "max_train_pairs": 2 * args.steps, "max_eval_pairs": 2,
                     "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "max_steps": args.steps,
                     "max_length": 256, "max_prompt_length": 128, "logging_steps": 1, "save_steps": 10**6,
                     "cache_dir": args.cache_dir, "dtype": "fp32"}
        if extra:
            overrides["lora_r"] = int(extra[1])
        run = train(load_config(None, overrides), Path(tmp) / "run")
        summary = run.summary()
    Path(args.out).write_text(json.dumps({"peak_rss_mb": summary["peak_rss_mb"], "pairs_per_s": summary["pairs_per_s"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-124m-random")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, default=None, help="JSON output (default: benchmarks/results/)")
    args, extra = parser.parse_known_args()
    if args.worker:
        worker(args, extra)
        return
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="dpolab-lora-cache-") as cache:
        for round_index in range(args.repeats):
            for name in rotated(list(VARIANTS), round_index):
                flags = ["--model", args.model, "--steps", str(args.steps), "--cache-dir", cache, *VARIANTS[name]]
                results[name].append(run_worker(Path(__file__), flags))
                print(f"{name}: {results[name][-1]}", flush=True)
    rss = {name: summarize([r["peak_rss_mb"] for r in runs]) for name, runs in results.items()}
    full, lora = (rss[name]["median"] for name in VARIANTS)
    lines = ["| variant | peak RSS median (min-max) | vs full |", "|---|---|---|"]
    for name, stats in rss.items():
        lines.append(f"| {name} | {stats['median']:,.0f} MB ({stats['min']:,.0f}-{stats['max']:,.0f}) | "
                     f"{stats['median'] / full:.2f}x |")
    publish("lora_memory", {"machine": machine_info(), "model": args.model, "steps": args.steps, "results": results,
                            "peak_rss_mb": rss, "lora_over_full": lora / full}, args.results, "\n".join(lines))


if __name__ == "__main__":
    main()
