"""The bf16-weights optimizer step on CPU: gradient clipping + fp32-master AdamW + write-back.

    python benchmarks/master_step.py --model gpt2-124m-random --threads 2 --repeats 5

What Trainer runs between backward and the next forward when CPU training keeps bf16 weights
with an fp32 master copy (``dpolab.precision.MasterWeightAdamW``), on the model's real parameter
shapes with random bf16 gradients:

* ``before``: the optimizer as it was at ``--before-rev`` (loaded from git), with the clipping
  Trainer ran then (``clip_master_grads`` where that revision has it, else torch's
  ``clip_grad_norm_``);
* ``after``: ``clip_master_grads`` (one foreach norm on the bf16 gradients) and ``step`` (cast,
  fused AdamW and write-back slice by slice, in cache).

The two alternate inside every repeat; median and best ms per step.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import machine_info, publish

REPO = Path(__file__).resolve().parent.parent


def load_before(rev: str) -> Any:
    """``dpolab.precision`` as it was at ``rev`` (needs git and the repository's history)."""
    source = subprocess.run(["git", "show", f"{rev}:src/dpolab/precision.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="dpolab-before-")) / "precision_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("precision_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-124m-random")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--before-rev", default="7aaf464")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from dpolab.model import build_builtin
    from dpolab.precision import MasterWeightAdamW

    before_module = load_before(args.before_rev)
    variants = {}
    for name in ("before", "after"):
        model = build_builtin(args.model).to(torch.bfloat16)
        optimizer_class = before_module.MasterWeightAdamW if name == "before" else MasterWeightAdamW
        variants[name] = (model, optimizer_class(model.parameters(), lr=5e-5, fused=True))
    params = sum(p.numel() for p in variants["after"][0].parameters())

    def step(name: str) -> float:
        model, optimizer = variants[name]
        for param in model.parameters():
            param.grad = torch.randn_like(param)  # (as backward leaves them: fresh bf16 tensors)
        start = time.perf_counter()
        if hasattr(optimizer, "clip_master_grads"):
            optimizer.clip_master_grads(1.0)
        else:  # revisions before clip_master_grads: Trainer's clip_grad_norm_
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in variants}
    for name in variants:
        step(name)  # warm-up: optimizer state, buffers
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(step(name))
    results = {name: {"ms_median": 1e3 * statistics.median(t), "ms_best": 1e3 * min(t)} for name, t in times.items()}
    results["after"]["vs_before"] = results["after"]["ms_median"] / results["before"]["ms_median"]
    lines = ["| optimizer step | ms median (best) | vs before |", "|---|---|---|",
             f"| before ({args.before_rev}) | {results['before']['ms_median']:.0f} ({results['before']['ms_best']:.0f}) "
             "| 1.00x |",
             f"| after | {results['after']['ms_median']:.0f} ({results['after']['ms_best']:.0f}) | "
             f"{results['after']['vs_before']:.2f}x |"]
    data = {"benchmark": "master_step", "command": " ".join(sys.argv), "machine": machine_info(),
            "model": args.model, "parameters": params, "results": results}
    publish("master_step", data, args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
