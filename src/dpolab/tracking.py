"""System metrics during training: CPU % and RSS always (psutil); GPU power, energy, utilisation
and memory per GPU through NVML (``nvidia-ml-py``) when a GPU is there. No GPU is not an error.

Samples go to the run folder's ``system.jsonl``; :meth:`SystemSampler.latest` lets the
trainer forward the newest sample to the trackers (W&B, MLflow, ...) with each log.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psutil

from dpolab.runs import RunFolder

logger = logging.getLogger(__name__)


def _nvml_handles() -> tuple[Any, list[Any]]:
    """(pynvml module, GPU handles), or (None, []) when NVML or a GPU is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no library, no driver, no GPU: all mean "sample the CPU only"
        return None, []


class SystemSampler:
    """Background thread sampling every ``interval_s`` seconds into ``run/system.jsonl``."""

    def __init__(self, run: RunFolder, interval_s: float = 2.0) -> None:
        self.run = run
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self._nvml, self._gpus = _nvml_handles()
        self._latest: dict[str, Any] = {}
        self._start = time.monotonic()

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "time_s": round(time.monotonic() - self._start, 3),
            "cpu_percent": self._process.cpu_percent(None),
            "rss_mb": round(self._process.memory_info().rss / 2**20, 1),
        }
        if self._gpus:
            nvml = self._nvml
            row["gpus"] = []
            for index, handle in enumerate(self._gpus):
                gpu = {"index": index,
                       "power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                       "util_percent": nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                       "mem_mb": round(nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20, 1)}
                try:  # total energy since driver load, mJ (Volta and newer)
                    gpu["energy_j"] = nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
                except Exception:
                    gpu["energy_j"] = None
                row["gpus"].append(gpu)
        return row

    def latest(self) -> dict[str, float]:
        """Newest sample flattened for trackers: ``system/cpu_percent``, ``system/gpu0_power_w``..."""
        flat = {f"system/{k}": v for k, v in self._latest.items() if k not in ("gpus", "time_s")}
        for gpu in self._latest.get("gpus", []):
            for key in ("power_w", "energy_j", "util_percent", "mem_mb"):
                if gpu.get(key) is not None:
                    flat[f"system/gpu{gpu['index']}_{key}"] = gpu[key]
        return flat

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._latest = self.sample()
            self.run.append_system(self._latest)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> SystemSampler:
        self._process.cpu_percent(None)  # prime: the first call always returns 0.0
        self._thread = threading.Thread(target=self._loop, name="dpolab-system-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._latest = self.sample()
        self.run.append_system(self._latest)
