"""Helpers shared by the benchmark scripts: machine description, one run per fresh subprocess,
and median / min-max summaries. Kept dependency-free (stdlib + psutil) so it imports anywhere."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch version/threads and the load average (other users' work)."""
    import torch

    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device-name fragment, most specific first:
# NVIDIA datasheets. The denominator of model FLOPs utilisation (MFU).
GPU_BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
]


def gpu_peak_tflops(device_name: str) -> float | None:
    """bf16 dense peak of a GPU from its name (``torch.cuda.get_device_name``); None if unknown."""
    for fragment, peak in GPU_BF16_PEAK_TFLOPS:
        if fragment in device_name:
            return peak
    return None


def training_flops_per_token(n_layer: int, n_embd: int, matmul_params: int, mean_seq_len: float) -> float:
    """Model FLOPs of one trained token (forward + backward), PaLM's formula (Chowdhery et al. 2022, App. B):
    ``6 N + 12 L H T``. N counts every weight a token is multiplied by (all non-embedding weights plus
    the LM head, V x H; the input embedding is a lookup); 12 L H T is attention's QK^T and AV with T the
    token-weighted mean sequence length (sum len^2 / sum len). Recomputation (gradient checkpointing),
    a reference model's forward and skipped work (dpolab's answer-only head) do not change it, so MFU
    compares variants on the same useful work."""
    return 6 * matmul_params + 12 * n_layer * n_embd * mean_seq_len


# GPT-2's matmuls, (tokens x K) @ (K x N) with K, N from one block: the QKV projection, the
# attention output projection, the MLP's up and down projections. M = tokens in one forward.
GPT2_GEMM_SHAPES: list[tuple[int, int]] = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]


def gemm_rates(device: str = "cpu", tokens: int = 1024, repeats: int = 10,
               shapes: list[tuple[int, int]] = GPT2_GEMM_SHAPES) -> dict[str, Any]:
    """The machine's matmul rate (TFLOP/s) on GPT-2's shapes, fp32 and bf16: the limit a training
    step's model FLOP rate is measured against (a step is mostly these GEMMs; what it does beyond
    them, casts, attention, the optimizer, shows as the share it falls short).

    Per dtype, each shape's best of ``repeats`` timings (best: the machine's rate, not a neighbour's
    load), then the rate of the whole set: its FLOPs over the sum of the best times (the mix a block
    runs). Uses torch's current thread count."""
    import time

    import torch

    result: dict[str, Any] = {"device": device, "tokens": tokens, "threads": torch.get_num_threads(),
                              "shapes": [list(s) for s in shapes]}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        total_flops, total_s, per_shape = 0.0, 0.0, {}
        for k, n in shapes:
            a = torch.randn(tokens, k, device=device, dtype=dtype)  # (M, K)
            b = torch.randn(k, n, device=device, dtype=dtype)  # (K, N)
            a @ b  # warm-up: kernel selection, allocator
            cuda_sync()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                a @ b
                cuda_sync()
                times.append(time.perf_counter() - start)
            flops = 2 * tokens * k * n
            per_shape[f"{tokens}x{k}x{n}"] = round(flops / min(times) / 1e12, 4)
            total_flops += flops
            total_s += min(times)
        result[f"{name}_tflops"] = total_flops / total_s / 1e12
        result[f"{name}_per_shape_tflops"] = per_shape
    return result


def gemm_share(model_tflops: float, rates: dict[str, Any], dtype: str) -> float:
    """A step's model FLOP rate as a share of the machine's GEMM rate in the dtype its matmuls ran in."""
    return model_tflops / rates[f"{dtype}_tflops"]


def cuda_sync() -> None:
    """Wait for queued GPU work, so wall-clock marks measure it (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    """Peak resident memory of THIS process (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: Path, args: list[str], timeout_s: float = 1800) -> dict[str, Any]:
    """Run ``script --worker ARGS --out tmp.json`` in a fresh interpreter and return its JSON.

    A fresh process per measurement makes peak RSS per run and leaves no warm caches behind.
    """
    with tempfile.TemporaryDirectory(prefix="dpolab-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--worker", *args, "--out", str(out)]
        env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def summarize(values: list[float]) -> dict[str, float]:
    """Median and range of repeated measurements (medians: robust to a noisy neighbour)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def rotated(items: list[str], round_index: int) -> list[str]:
    """Alternate the run order every round so slow drift (other load) hits every variant alike."""
    k = round_index % len(items)
    return items[k:] + items[:k]


def write_results(name: str, data: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    logger.info("results: %s", path)
    return path


def publish(name: str, data: dict[str, Any], out: Path | None, table: str) -> None:
    """Write the raw JSON and print the Markdown table that goes into BENCHMARKS.md."""
    path = write_results(name, data, out)
    print(table)
    print(f"\nraw results: {path}")
