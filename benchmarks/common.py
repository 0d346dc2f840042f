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
