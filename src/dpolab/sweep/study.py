"""The Optuna side of a sweep: storage, study creation, claiming trials, dead-worker recovery.

Every worker (process, machine) talks to one RDB storage: a SQLite file in the sweep folder by
default, or ``--storage URL`` (PostgreSQL) for several machines. Grid points are queued as
WAITING trials when the study is created; a worker claims one with the storage's atomic
WAITING -> RUNNING transition (row lock), so no point ever runs twice.

A worker that dies leaves its trial RUNNING. Two ways bring it back, both marking the dead
attempt FAIL (with the reason) and queueing a copy under the same trial name:
  * same machine: the trial records ``host``/``pid``/process start time; a dead pid is seen at once;
  * other machines: no heartbeat for ``grace_period`` seconds (Optuna's heartbeat machinery).
A trial is queued again at most ``max_retry`` times: one that kills its worker every time (out of
memory, a crash in native code) then stays FAIL instead of being re-queued forever.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from dpolab.errors import ConfigError, first_line
from dpolab.periodic import Periodic
from dpolab.runs import SweepFolder
from dpolab.sweep.config import SweepConfig

logger = logging.getLogger(__name__)

NAME_ATTR = "trial_name"       # the trial folder: trials/<name>/, kept by retries
OVERRIDES_ATTR = "overrides"   # the TrainConfig overrides of this trial
WORKER_ATTR = "worker"         # {host, pid, started} of the process running it
ERROR_ATTR = "error"           # one line: why it failed
RETRIES_ATTR = "retries"       # times this trial was queued again after its worker died

# Query parameters of a storage URL whose value is a secret (libpq: password, sslpassword).
SECRET_PARAM = re.compile(r"pass|secret|token", re.IGNORECASE)


def default_storage_url(sweep_dir: Path) -> str:
    return f"sqlite:///{SweepFolder(Path(sweep_dir).resolve()).study_db}"


def redact(url: str) -> str:
    """The storage URL without its secrets (it goes into sweep.json and logs): the password of
    ``user:pw@host`` and of query parameters such as libpq's ``?password=``."""
    base, sep, query = url.partition("?")
    if "://" in base and "@" in base:
        scheme, rest = base.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        if ":" in credentials:
            base = f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    pairs = [pair.split("=", 1)[0] + "=***" if SECRET_PARAM.search(pair.split("=", 1)[0]) else pair
             for pair in query.split("&")] if query else []
    return base + sep + "&".join(pairs)


def make_storage(url: str, config: SweepConfig) -> optuna.storages.RDBStorage:
    """The shared study storage, or a one-line :class:`ConfigError` when it cannot be used."""
    from sqlalchemy.exc import SQLAlchemyError

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several local workers share one SQLite file: wait for the write lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable enough
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=config.heartbeat_interval,
                grace_period=config.grace_period, heartbeat_stale_trial_callback=Requeue(config.max_retry))
    except ImportError as exc:  # SQLAlchemy loads the URL's driver (postgresql:// means psycopg2)
        raise ConfigError(f"--storage {redact(url)}: its database driver is not installed ({exc}); "
                          "e.g. pip install psycopg2-binary for postgresql://") from None
    except (SQLAlchemyError, ValueError) as exc:
        detail = first_line(str(getattr(exc, "orig", None) or exc))  # the driver's own message, if any
        raise ConfigError(f"--storage {redact(url)}: cannot use it ({type(exc).__name__}: {detail})") from None


def signature(config: SweepConfig) -> dict[str, Any]:
    """What defines a study's trials. A re-run or a second worker must match it exactly."""
    sig = {"mode": config.mode, "base": config.base, "objective": config.objective, "direction": config.direction}
    if config.mode == "grid":
        sig["grid_points"] = config.grid_points()
    else:
        sig["search_space"] = config.search_space
        sig["n_trials"] = config.n_trials
    return json.loads(json.dumps(sig, sort_keys=True, default=str))


def open_study(config: SweepConfig, storage: optuna.storages.RDBStorage, study_name: str,
               create: bool = True) -> optuna.Study:
    """Load the study, or create it (queueing every grid point) when ``create`` and it is new."""
    sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(seed=config.sampler_seed)
    if config.use_pruning:
        pruner: optuna.pruners.BasePruner = optuna.pruners.MedianPruner(
            n_startup_trials=config.pruner_startup_trials, n_warmup_steps=config.pruner_warmup_steps)
    else:
        pruner = optuna.pruners.NopPruner()
    exists = study_name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if not exists and not create:
        raise ConfigError(f"study {study_name!r} does not exist in the storage; create it first "
                          "(dpolab sweep --create-only)")
    study = optuna.create_study(storage=storage, study_name=study_name, direction=config.direction,
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    wanted = signature(config)
    stored = study.user_attrs.get("signature")
    if stored is None:
        study.set_user_attr("signature", wanted)
        if config.mode == "grid" and not study.get_trials(deepcopy=False):
            for point in config.grid_points():
                overrides = {k: v for k, v in point.items() if k != "name"}
                study.add_trial(optuna.trial.create_trial(
                    state=TrialState.WAITING, user_attrs={NAME_ATTR: point["name"], OVERRIDES_ATTR: overrides}))
            logger.info("study %s: queued %d grid configurations", study_name, len(config.grid_points()))
    elif stored != wanted:
        raise ConfigError(f"study {study_name!r} was created from a different sweep config; use another "
                          "--output-dir (or study name) for a new study")
    return study


# -- claiming and recovering trials ---------------------------------------------------------------

def trial_id(study: optuna.Study, storage: optuna.storages.BaseStorage, number: int) -> int:
    """The storage's id of the study's trial ``number``, which the storage's methods take. Asked
    through the storage's public API: Trial and FrozenTrial keep theirs in a private attribute."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def claim_waiting(study: optuna.Study, storage: optuna.storages.RDBStorage) -> optuna.Trial | None:
    """Atomically take one queued trial (WAITING -> RUNNING), or None when the queue is empty."""
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            claimed = trial_id(study, storage, frozen.number)
            if storage.set_trial_state_values(claimed, state=TrialState.RUNNING):
                return optuna.Trial(study, claimed)
        except UpdateFinishedTrialError:
            continue
    return None


def this_worker() -> dict[str, Any]:
    process = psutil.Process()
    return {"host": socket.gethostname(), "pid": process.pid, "started": process.create_time()}


def _alive(worker: dict[str, Any]) -> bool:
    try:
        return math.isclose(psutil.Process(int(worker["pid"])).create_time(), worker["started"], abs_tol=1.0)
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
        return False


def recover_dead_workers(study: optuna.Study, storage: optuna.storages.RDBStorage, max_retry: int) -> int:
    """Fail and re-queue RUNNING trials whose worker is gone: same host at once, others by heartbeat."""
    recovered = 0
    host = socket.gethostname()
    requeue = Requeue(max_retry)
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = frozen.user_attrs.get(WORKER_ATTR)
        if not worker or worker.get("host") != host or _alive(worker):
            continue
        reason = f"worker {host}:{worker.get('pid')} died while running it"
        if requeue.exhausted(frozen):
            reason += f" ({frozen.user_attrs.get(RETRIES_ATTR, 0) + 1} attempts, max_retry {max_retry}: not retried)"
        try:
            dead = trial_id(study, storage, frozen.number)
            storage.set_trial_user_attr(dead, ERROR_ATTR, reason)
            if storage.set_trial_state_values(dead, state=TrialState.FAIL):
                requeue(study, storage.get_trial(dead))
                recovered += 1
        except UpdateFinishedTrialError:  # another worker recovered it first
            continue
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # other machines: heartbeat older than grace_period
    return recovered


class Requeue:
    """Queue a fresh attempt of a trial whose worker died (same name, params and overrides), at
    most ``max_retry`` times: the meaning of Optuna's ``RetryHeartbeatStaleTrialCallback(max_retry)``.
    Ours because the copy must not inherit the dead attempt's worker and error."""

    def __init__(self, max_retry: int) -> None:
        self.max_retry = max_retry

    def exhausted(self, failed: FrozenTrial) -> bool:
        return failed.user_attrs.get(RETRIES_ATTR, 0) >= self.max_retry

    def __call__(self, study: optuna.Study, failed: FrozenTrial) -> None:
        name = failed.user_attrs.get(NAME_ATTR)
        if self.exhausted(failed):
            logger.error("trial %s (#%d): its worker died on every attempt; recorded as failed, not queued again",
                         name, failed.number)
            return
        attrs = {k: v for k, v in failed.user_attrs.items() if k not in (WORKER_ATTR, ERROR_ATTR)}
        attrs["retry_of"] = failed.number
        attrs[RETRIES_ATTR] = failed.user_attrs.get(RETRIES_ATTR, 0) + 1
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=failed.params,
                                                  distributions=failed.distributions, user_attrs=attrs))
        logger.warning("trial %s (#%d) was interrupted; queued again (retry %d of %d)",
                       name, failed.number, attrs[RETRIES_ATTR], self.max_retry)


def abandoned(study: optuna.Study) -> list[FrozenTrial]:
    """Trials whose latest attempt FAILED without being queued again (a retried trial's latest
    attempt is WAITING or later)."""
    latest: dict[str, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False):
        latest[trial.user_attrs.get(NAME_ATTR, f"#{trial.number}")] = trial  # in number order
    return [t for t in latest.values() if t.state == TrialState.FAIL]


def trials_used(study: optuna.Study) -> int:
    """Search budget used: distinct trial names (a re-queued attempt is the same trial)."""
    return len({t.user_attrs.get(NAME_ATTR, f"#{t.number}") for t in study.get_trials(deepcopy=False)})


class Heartbeat(Periodic):
    """Records the trial's heartbeat in the storage while it runs (what Optuna's own optimize() does)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval_s: float) -> None:
        super().__init__(interval_s, name="dpolab-heartbeat")
        self.storage, self.trial_id = storage, trial_id

    def tick(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception as exc:  # a transient storage error must not kill the trial
            logger.warning("heartbeat failed: %s", exc)
