"""``dpolab sweep``: grid or Optuna TPE search over DPO hyper-parameters, one fresh trainer per trial.

Public API (used by ``dpolab demo``)::

    from dpolab.sweep import load_sweep_config, run_sweep
    sweep = run_sweep(load_sweep_config("configs/sweep-demo.yaml"), "runs/demo-sweep")
    sweep.best()  # {"trial", "run_dir", "model_dir", "objective", "value", ...}
"""

from dpolab.sweep.config import ORIGINAL_TABLE, SweepConfig, load_sweep_config
from dpolab.sweep.runner import prepare_sweep, run_sweep

__all__ = ["ORIGINAL_TABLE", "SweepConfig", "load_sweep_config", "prepare_sweep", "run_sweep"]
