"""``dpolab sweep``: grid or Optuna TPE search over DPO hyper-parameters, one fresh trainer per trial.

Public API (used by ``dpolab demo``)::

    from dpolab.sweep import load_sweep_config, run_sweep
    sweep = run_sweep(load_sweep_config("configs/sweep-demo.yaml"), "runs/demo-sweep")
    sweep.best()  # {"trial", "run_dir", "model_dir", "objective", "value", ...}
"""

from importlib import import_module
from typing import Any

# Resolved on first use (PEP 562): `dpolab --help` imports every stage's cli.py, which must not
# pull in torch or matplotlib through this package.
_EXPORTS = {'ORIGINAL_TABLE': 'dpolab.sweep.config', 'SweepConfig': 'dpolab.sweep.config', 'load_sweep_config': 'dpolab.sweep.config', 'prepare_sweep': 'dpolab.sweep.runner', 'run_sweep': 'dpolab.sweep.runner'}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
