"""CPU attention: SDPA's math vs flash backend, forward + backward, at the lengths training uses.

    python benchmarks/sdpa_backends.py --threads 2 --repeats 5

One GPT-2 124M attention (12 heads x 64) over packed rows: each row holds whole sequences end to
end, kept apart by the block-diagonal causal mask transformers builds from packed position ids
(what `dpolab train` runs on CPU), ``--row-lengths`` tokens per row, ``--tokens`` tokens in all.
The backends alternate inside every repeat (a neighbour's load hits both); best and median of
``--repeats``. ``flash_fp32`` is flash on bf16 inputs cast to fp32 (and the output back): the answer decides
what a CPU bf16 step should run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import machine_info, publish
from torch.nn.attention import SDPBackend, sdpa_kernel

# name: (backend, q/k/v cast to fp32 around the kernel)
BACKENDS = {"math": (SDPBackend.MATH, False), "flash": (SDPBackend.FLASH_ATTENTION, False),
            "flash_fp32": (SDPBackend.FLASH_ATTENTION, True)}


def block_causal_mask(row_length: int, sequence_length: int) -> torch.Tensor:
    """(L, L) bool: causal inside each sequence of ``sequence_length`` tokens, nothing across."""
    segment = torch.arange(row_length) // sequence_length
    causal = torch.ones(row_length, row_length, dtype=torch.bool).tril()
    return causal & (segment[:, None] == segment[None, :])


def time_attention(backend: SDPBackend, q, k, v, mask, upcast: bool = False) -> float:
    """One forward + backward; ``upcast``: bf16 q, k, v cast to fp32 for the kernel, the output back."""
    for t in (q, k, v):
        t.grad = None
    start = time.perf_counter()
    with sdpa_kernel(backend):
        args = (q.float(), k.float(), v.float()) if upcast else (q, k, v)
        out = torch.nn.functional.scaled_dot_product_attention(*args, attn_mask=mask).to(q.dtype)
        out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def measure(row_length: int, tokens: int, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    rows = max(1, tokens // row_length)
    shape = (rows, 12, row_length, 64)  # (R, heads, L, head dim)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = block_causal_mask(row_length, sequence_length=160)[None, None]  # HH sequences average ~160 tokens
    backends = {n: b for n, b in BACKENDS.items() if dtype != torch.float32 or not b[1]}  # fp32 has nothing to cast
    times: dict[str, list[float]] = {name: [] for name in backends}
    for backend, upcast in backends.values():
        time_attention(backend, q, k, v, mask, upcast)  # warm-up
    for _ in range(repeats):
        for name, (backend, upcast) in backends.items():
            times[name].append(time_attention(backend, q, k, v, mask, upcast))
    result = {"rows": rows, "row_length": row_length, "dtype": str(dtype).removeprefix("torch.")}
    for name, values in times.items():
        result[f"{name}_ms_best"] = 1e3 * min(values)
        result[f"{name}_ms_median"] = 1e3 * statistics.median(values)
    for name in times:
        result[f"{name}_vs_math"] = result[f"{name}_ms_median"] / result["math_ms_median"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row-lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--tokens", type=int, default=1536, help="tokens in all (rows = tokens // row length)")
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    results = [measure(length, args.tokens, dtypes[d], args.repeats) for d in args.dtypes for length in args.row_lengths]
    lines = ["| dtype | rows x length | backend | ms median (best) | vs math |", "|---|---|---|---|---|"]
    for r in results:
        for name in BACKENDS:
            if f"{name}_ms_median" in r:
                lines.append(f"| {r['dtype']} | {r['rows']} x {r['row_length']} | {name} | "
                             f"{r[f'{name}_ms_median']:.1f} ({r[f'{name}_ms_best']:.1f}) | {r[f'{name}_vs_math']:.2f}x |")
    data = {"benchmark": "sdpa_backends", "command": " ".join(sys.argv), "machine": machine_info(),
            "tokens": args.tokens, "results": results}
    publish("sdpa_backends", data, args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
