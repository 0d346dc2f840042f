"""``dpolab sweep``: grid or Optuna TPE search over DPO hyper-parameters, one fresh trainer per trial.

Public API (used by ``dpolab demo``)::

    from dpolab.sweep import load_sweep_config, run_sweep
    sweep = run_sweep(load_sweep_config("configs/sweep-demo.yaml"), "runs/demo-sweep")
    sweep.best()  # {"trial", "run_dir", "model_dir", "objective", "value", ...}
"""

from dpolab.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {'ORIGINAL_TABLE': 'dpolab.sweep.config', 'SweepConfig': 'dpolab.sweep.config', 'load_sweep_config': 'dpolab.sweep.config', 'prepare_sweep': 'dpolab.sweep.runner', 'run_sweep': 'dpolab.sweep.runner'})
