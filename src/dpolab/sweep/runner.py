"""Run a sweep: our own loop, one fresh trainer per trial built from the trial's config.

(``Trainer.hyperparameter_search`` is not used: it cannot change DPO's beta - not a
TrainingArguments field - and its default objective sums every eval metric.)

    prepare_sweep()  create the folder and the study, queue the grid, run the reference pass once
    run_sweep()      prepare (if needed), then work: claim a trial, train it, tell the study, repeat
"""

from __future__ import annotations

import gc
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from transformers import TrainerCallback

from dpolab.config import TrainConfig
from dpolab.errors import ConfigError, RunFolderError, first_line
from dpolab.runs import RunFolder, SweepFolder
from dpolab.sweep import study as st
from dpolab.sweep.config import SweepConfig
from dpolab.tracking import env_defaults, sweep_tracker_defaults

logger = logging.getLogger(__name__)

def objective_value(summary: dict[str, Any], objective: str) -> float:
    """``eval/<metric>`` from the final eval, else a top-level number of summary.json."""
    source, key = (summary.get("eval", {}), objective[5:]) if objective.startswith("eval/") else (summary, objective)
    if key not in source:
        why = (" (length-controlled metrics come from the dpolab engine's DPO evaluation; an accuracy whose "
               "length stratum has no held-out pairs is not recorded)" if key.startswith(("length/", "rewards/accuracies_"))
               else "")
        raise KeyError(f"objective {objective!r} not in the run summary{why}")
    return float(source[key])


def _trainer_metric(objective: str) -> str | None:
    """The key of the objective in Trainer's evaluate() metrics (None: no intermediate values)."""
    return f"eval_{objective[5:]}" if objective.startswith("eval/") else None


class PruningCallback(TrainerCallback):
    """Reports every intermediate evaluation to the trial and stops it when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), step=state.global_step)
        if self.trial.should_prune():
            # Propagates out of Trainer.train() and train(); the runner records the trial as PRUNED.
            raise optuna.TrialPruned(f"{self.metric}={value:.4f} at step {state.global_step} is worse than the median")


def suggest(trial: optuna.Trial, key: str, spec: dict[str, Any]) -> Any:
    if "choices" in spec:
        return trial.suggest_categorical(key, spec["choices"])
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool):
        return trial.suggest_int(key, low, high, log=log)
    return trial.suggest_float(key, float(low), float(high), log=log)


def study_name_of(config: SweepConfig, sweep_dir: Path) -> str:
    return config.name or Path(sweep_dir).resolve().name


# -- preparing ----------------------------------------------------------------------------------

def prepare_sweep(config: SweepConfig, sweep_dir: str | Path, storage: str | None = None,
                  warm_caches: bool = True) -> SweepFolder:
    """Create (or reopen) the sweep folder and the study, and fill the shared caches once.

    Run it once before starting several workers; :func:`run_sweep` calls it too, so a single
    worker needs nothing else. Safe to repeat: an existing study is checked, not re-created.
    """
    sweep_dir = Path(sweep_dir)
    url = storage or st.default_storage_url(sweep_dir)
    name = study_name_of(config, sweep_dir)
    # An unusable --storage fails before any folder is made (the default one lives in the folder).
    backend = st.make_storage(url, config) if storage else None
    if SweepFolder.is_sweep(sweep_dir):
        sweep = SweepFolder.open(sweep_dir)
        info = sweep.info()
    else:
        info = {"mode": config.mode, "objective": config.objective, "direction": config.direction,
                "study_name": name, "storage": st.redact(url), "config": config.to_dict()}
        sweep = SweepFolder.create(sweep_dir, info)
    st.open_study(config, backend or st.make_storage(url, config), name, create=True)
    if warm_caches and "reference" not in info:
        info["reference"] = fill_caches(config)
        sweep.update_info(reference=info["reference"])
    return sweep


def fill_caches(config: SweepConfig) -> list[dict[str, Any]]:
    """Tokenize the data and run the reference pass once per distinct data/reference setup.

    Every trial then reads both from the cache (its summary says ``reference_cache: hit``); the
    records returned here (saved in sweep.json) are where the one ``miss`` of the sweep shows.
    """
    from dpolab.data import data_cache_key
    from dpolab.dpo.trainer import load_prepared
    from dpolab.model import load_tokenizer

    seen: dict[tuple, dict[str, Any]] = {}
    values = [config.train_values(p) for p in config.grid_points()] or [config.train_values({})]
    for value in values:
        try:
            train_config = TrainConfig.from_dict(value, source="sweep")
        except ConfigError:
            continue  # that trial will fail on its own, with this error
        if train_config.stage == "sft" or train_config.reference_free:
            continue  # no reference pass (the data cache fills with the first trial)
        # What the reference pass's cache key depends on: the data (its own cache key, the one
        # function training uses), the reference model, the precision it scores in, the cache, and
        # whether LD-DPO's answer tails are kept (a cache of their own).
        key = (data_cache_key(train_config, load_tokenizer(train_config.model)),
               train_config.ref_model or train_config.model, train_config.dtype, train_config.cache_dir,
               train_config.ld_alpha is not None)
        if key in seen:
            continue
        start = time.perf_counter()
        prepared = load_prepared(train_config)
        reference_info, dtype = prepared.reference_info, prepared.setup.settings.dtype
        del prepared
        gc.collect()
        # dtype: what "auto" resolved to for this setup; its trials resolve the same (the probe's
        # verdict is cached), so they compare.
        seen[key] = {**reference_info, "model": train_config.model, "dataset": train_config.dataset,
                     "dtype": dtype, "prepare_time_s": round(time.perf_counter() - start, 3)}
        logger.info("sweep: reference pass for %s on %s: %s (%.1f s); trials will read the cache",
                    train_config.model, train_config.dataset,
                    "computed once" if reference_info["reference_cache"] == "miss" else "already cached",
                    reference_info["reference_time_s"])
    return list(seen.values())


# -- running ------------------------------------------------------------------------------------

def run_sweep(config: SweepConfig, sweep_dir: str | Path, storage: str | None = None,
              max_trials: int | None = None, report_to: list[str] | None = None) -> SweepFolder:
    """Prepare the sweep if needed, then run trials until none is left (or ``max_trials`` ran here).

    Re-running resumes: finished trials are skipped, interrupted ones run again (from their last
    checkpoint). Several workers may run this at once on one ``storage``. Returns the sweep
    folder; ``best.json`` names the best finished trial.
    """
    if report_to is not None:
        config.base = {**config.base, "report_to": list(report_to)}
    sweep = prepare_sweep(config, sweep_dir, storage)
    url = storage or st.default_storage_url(Path(sweep_dir))
    backend = st.make_storage(url, config)
    name = study_name_of(config, Path(sweep_dir))
    study = st.open_study(config, backend, name, create=False)
    trackers = config.base.get("report_to") or []
    trackers = [t for t in trackers.split(",") if t] if isinstance(trackers, str) else list(trackers)
    ran = 0
    with env_defaults(sweep_tracker_defaults(trackers, sweep.path, name)):
        while max_trials is None or ran < max_trials:
            st.recover_dead_workers(study, backend, config.max_retry)
            record_abandoned(study, sweep)
            trial = st.claim_waiting(study, backend)
            if trial is None:
                if config.mode == "grid" or st.trials_used(study) >= config.n_trials:
                    break
                with warnings.catch_warnings():  # we send the heartbeats ourselves (study.Heartbeat)
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    trial = study.ask()
            run_trial(study, trial, config, sweep, backend)
            ran += 1
            update_best(study, config, sweep)
    update_best(study, config, sweep)
    counts = {s.name.lower(): sum(t.state == s for t in study.get_trials(deepcopy=False))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    logger.info("sweep %s: this worker ran %d trial(s); study: %s", name, ran,
                ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    return sweep


def run_trial(study: optuna.Study, trial: optuna.Trial, config: SweepConfig, sweep: SweepFolder,
              backend: optuna.storages.RDBStorage) -> TrialState:
    """Train one trial and tell the study how it ended. Never raises for a failed trial."""
    from dpolab.stages import train

    attrs = trial.user_attrs
    name = attrs.get(st.NAME_ATTR) or f"trial-{trial.number:03d}"
    trial.set_user_attr(st.NAME_ATTR, name)
    trial.set_user_attr(st.WORKER_ATTR, st.this_worker())
    if config.mode == "search":
        overrides = {key: suggest(trial, key, spec) for key, spec in config.search_space.items()}
        trial.set_user_attr(st.OVERRIDES_ATTR, overrides)
    else:
        overrides = dict(attrs.get(st.OVERRIDES_ATTR) or {})
    run_dir = sweep.trial_dir(name)
    record = {"trial": name, "optuna_trial": trial.number, "overrides": overrides, "retry_of": attrs.get("retry_of")}
    logger.info("trial %s (#%d) starting: %s", name, trial.number, overrides)
    start = time.perf_counter()
    state, value, error = TrialState.FAIL, None, None
    try:
        with st.Heartbeat(backend, st.trial_id(study, backend, trial.number), config.heartbeat_interval):
            train_config = TrainConfig.from_dict(config.train_values(overrides), source=f"trial {name}")
            if RunFolder.is_run(run_dir) and RunFolder(run_dir).is_finished():
                # Finished before its worker died (between summary and tell): do not train it twice.
                logger.info("trial %s already finished training; reusing its records", name)
                summary = RunFolder(run_dir).summary()
            else:
                metric = _trainer_metric(config.objective)
                callbacks: list[TrainerCallback] = []
                if config.use_pruning and metric:
                    callbacks.append(PruningCallback(trial, metric))
                # An interrupted trial's folder continues from its last checkpoint; a new one starts.
                resume = RunFolder.is_run(run_dir)
                summary = train(train_config, run_dir, resume=resume, callbacks=callbacks).summary()
            value = objective_value(summary, config.objective)
            if not math.isfinite(value):
                raise FloatingPointError(f"{config.objective} is {value} (training diverged)")
            study.tell(trial, value)
            state = TrialState.COMPLETE
    except optuna.TrialPruned as exc:
        study.tell(trial, state=TrialState.PRUNED)
        state, error = TrialState.PRUNED, str(exc)
    except Exception as exc:  # failed trial: record it, keep sweeping (KeyboardInterrupt still stops)
        error = first_line(exc, with_type=True)
        logger.error("trial %s failed: %s", name, error, exc_info=logger.isEnabledFor(logging.DEBUG))
        trial.set_user_attr(st.ERROR_ATTR, error)
        study.tell(trial, state=TrialState.FAIL)
    finally:
        _free_memory()
    elapsed = time.perf_counter() - start
    record.update({"state": state.name.lower(), "value": value, "error": error, "time_s": round(elapsed, 3)})
    sweep.write_trial_record(name, record)
    logger.info("trial %s %s%s in %.1f s", name, state.name.lower(),
                f": {config.objective} = {value:.4f}" if value is not None else f" ({error})" if error else "", elapsed)
    return state


def record_abandoned(study: optuna.Study, sweep: SweepFolder) -> None:
    """Write trial.json for trials whose worker died on the last allowed attempt (the dying worker
    could not), so the sweep's records say they failed and why."""
    for frozen in st.abandoned(study):
        name = frozen.user_attrs.get(st.NAME_ATTR, f"trial-{frozen.number:03d}")
        if sweep.trial_record(name) is None:
            sweep.write_trial_record(name, {
                "trial": name, "optuna_trial": frozen.number, "overrides": frozen.user_attrs.get(st.OVERRIDES_ATTR, {}),
                "retry_of": frozen.user_attrs.get("retry_of"), "state": "fail", "value": None,
                "error": frozen.user_attrs.get(st.ERROR_ATTR, "worker stopped sending heartbeats while running it"),
                "time_s": None})


def _free_memory() -> None:
    """After a trial (an OOM one above all) give memory back before the next starts."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except RuntimeError as exc:  # a CUDA error left by the failed trial: its record must still be written
        logger.warning("could not free GPU memory after the trial: %s", exc)


def update_best(study: optuna.Study, config: SweepConfig, sweep: SweepFolder) -> dict[str, Any] | None:
    """Write ``best.json`` for the best COMPLETE trial (paths relative to the sweep folder)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not complete:
        return None
    if config.direction == "minimize":
        best = min(complete, key=lambda t: (t.value, t.number))  # ties: the earlier trial
    else:
        best = max(complete, key=lambda t: (t.value, -t.number))
    name = best.user_attrs.get(st.NAME_ATTR, f"trial-{best.number:03d}")
    record = {"trial": name, "run_dir": f"trials/{name}", "model_dir": f"trials/{name}/model",
              "objective": config.objective, "direction": config.direction, "value": best.value,
              "overrides": best.user_attrs.get(st.OVERRIDES_ATTR, {}), "optuna_trial": best.number}
    if sweep.has_best():
        try:
            if {k: v for k, v in sweep.best().items() if k != "format"} == record:
                return record
        except RunFolderError:  # a best.json that is not valid JSON (edited by hand) is written again
            pass
    sweep.write_best(record)
    return record
