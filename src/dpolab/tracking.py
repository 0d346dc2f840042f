"""System metrics during training: CPU % and RSS always (psutil); GPU power, energy, utilisation
and memory per GPU through NVML (``nvidia-ml-py``) when a GPU is there. No GPU is not an error.

Samples go to the run folder's ``system.jsonl``; :meth:`SystemSampler.latest` lets the
trainer forward the newest sample to the trackers (W&B, MLflow, ...) with each log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from dpolab.periodic import Periodic
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


class SystemSampler(Periodic):
    """Background thread sampling every ``interval_s`` seconds into ``run/system.jsonl``."""

    def __init__(self, run: RunFolder, interval_s: float = 2.0) -> None:
        # Wait before the first sample: cpu_percent over the few microseconds since priming is tick
        # noise (thousands of %).
        super().__init__(interval_s, name="dpolab-system-sampler", tick_at_start=False)
        self.run = run
        self._process = psutil.Process()
        self._nvml, self._gpus = _nvml_handles()
        self._latest: dict[str, Any] = {}
        self._start = time.monotonic()
        # Under torchrun every rank samples (its logs carry the readings), only rank 0 records them:
        # one writer per file, and NVML already reads every GPU of the machine.
        self._records = int(os.environ.get("RANK", "0")) == 0

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "time_s": round(time.monotonic() - self._start, 3),
            "cpu_percent": min(self._process.cpu_percent(None), 100.0 * (psutil.cpu_count() or 1)),
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

    def tick(self) -> None:
        self._latest = self.sample()
        if self._records:
            self.run.append_system(self._latest)

    def __enter__(self) -> SystemSampler:
        self._process.cpu_percent(None)  # prime: the first call always returns 0.0
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.tick()  # the state at the end


# ---------------------------------------------------------------------------------------------
# Tracker integrations (``report_to``): defaults and clean run boundaries
# ---------------------------------------------------------------------------------------------

def tracker_defaults(report_to: list[str], run_dir: Path) -> dict[str, str]:
    """Environment defaults that keep a run's tracker files inside its run folder.

    MLflow's default store is a SQLite file in the run folder (a sweep points every trial at one
    file in the sweep folder instead, see :func:`sweep_tracker_defaults`); W&B writes its
    ``wandb/`` folder (offline runs included) into the run folder instead of the working directory.
    """
    run_dir = Path(run_dir).resolve()
    defaults: dict[str, str] = {}
    if "mlflow" in report_to:
        defaults["MLFLOW_TRACKING_URI"] = f"sqlite:///{run_dir / 'mlflow.db'}"
        # Named, so transformers calls mlflow.set_experiment in *this* store: MLflow otherwise
        # reuses the experiment id it cached for an earlier run of the process (a sweep's store).
        defaults["MLFLOW_EXPERIMENT_NAME"] = "dpolab"
    if "wandb" in report_to:
        defaults["WANDB_DIR"] = str(run_dir)
        defaults["WANDB_PROJECT"] = "dpolab"
    if "tensorboard" in report_to:
        defaults["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "trackio" in report_to:
        defaults["TRACKIO_DIR"] = str(run_dir / "trackio")
    return defaults


def sweep_tracker_defaults(report_to: list[str], sweep_dir: Path, group: str) -> dict[str, str]:
    """A sweep groups its trials: one W&B group, one MLflow experiment in one store."""
    defaults: dict[str, str] = {}
    if "mlflow" in report_to:
        defaults["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(sweep_dir).resolve() / 'mlflow.db'}"
        defaults["MLFLOW_EXPERIMENT_NAME"] = group
    if "wandb" in report_to:
        defaults["WANDB_RUN_GROUP"] = group
        defaults["WANDB_PROJECT"] = "dpolab"
    if "trackio" in report_to:  # Trackio fixes its store at first import: one per sweep process
        defaults["TRACKIO_DIR"] = str(Path(sweep_dir).resolve() / "trackio")
    return defaults


@contextmanager
def env_defaults(defaults: dict[str, str]) -> Iterator[None]:
    """Set each variable the user has not set, for the duration of the block only."""
    added = [key for key in defaults if key not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def end_tracker_runs(failed: bool = False) -> None:
    """Close the W&B / MLflow runs that the Trainer integrations opened.

    transformers' W&B callback never finishes its run and MLflow's stays open after an exception:
    the next ``train()`` in the same process (every sweep trial) would log into the old run.
    """
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED" if failed else "FINISHED")


def wandb_offline_unless_logged_in(report_to: list[str], run_dir: Path) -> None:
    """Run W&B offline when it is asked for, no ``WANDB_MODE`` is set and no login is found.

    Without a key W&B asks at a terminal and raises "No API key configured" anywhere else, long
    after the data was prepared; offline, the run is kept in ``RUN/wandb/`` for ``wandb sync``.
    W&B reads its environment once per process, so the mode is set through ``wandb.setup``.
    """
    if "wandb" not in report_to or "WANDB_MODE" in os.environ:
        return
    import wandb

    if wandb.setup().settings.mode in ("offline", "dryrun", "disabled"):
        return  # decided already (an earlier run of this process, a sweep's trial)
    # Looks for WANDB_API_KEY, W&B's settings files and ~/.netrc; never prompts, never goes online.
    if wandb.login(prompt=False, verify=False):
        return
    logger.warning("W&B: no API key or login found (WANDB_API_KEY, `wandb login`): logging offline into "
                   "%s; `wandb sync` uploads it later", Path(run_dir).resolve() / "wandb")
    wandb.setup(wandb.Settings(mode="offline"))


def mlflow_artifact_store() -> None:
    """Keep a local MLflow store's artifacts beside it, not in the working directory.

    An SQLite store puts artifacts (the samples tables) in ``./mlruns`` of the working directory
    unless the experiment names a location. So the experiment transformers logs into is created
    here first, with ``mlartifacts/`` next to the database file (``RUN/mlflow.db`` by default);
    an experiment that exists already, and any other kind of store, keep their own location.
    """
    uri, name = os.environ.get("MLFLOW_TRACKING_URI", ""), os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not (uri.startswith("sqlite:///") and name):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        artifacts = Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
        client.create_experiment(name, artifact_location=artifacts.as_uri())


@contextmanager
def tracker_session(report_to: list[str], run_dir: Path) -> Iterator[None]:
    """One training run's tracker scope: run-folder defaults in, tracker runs closed out."""
    if not report_to:
        yield
        return
    failed = True
    with env_defaults(tracker_defaults(report_to, run_dir)):
        wandb_offline_unless_logged_in(report_to, run_dir)  # inside: W&B reads WANDB_DIR once, here
        if "mlflow" in report_to:
            mlflow_artifact_store()
        try:
            yield
            failed = False
        finally:
            end_tracker_runs(failed)
