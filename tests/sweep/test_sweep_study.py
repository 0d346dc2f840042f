"""Study bookkeeping without training: grid queueing, atomic claims, recovery of trials whose worker
died (same machine: dead pid at once; another machine: heartbeat older than the grace period)."""

from __future__ import annotations

import time

import pytest
from optuna.trial import TrialState

from dpolab.errors import ConfigError
from dpolab.sweep import SweepConfig
from dpolab.sweep.study import (
    NAME_ATTR,
    WORKER_ATTR,
    claim_waiting,
    default_storage_url,
    make_storage,
    open_study,
    recover_dead_workers,
    redact,
)


def grid(**values) -> SweepConfig:
    return SweepConfig(trials=[{"name": "a", "beta": 0.1}, {"name": "b", "beta": 0.2}], **values)


def test_grid_is_queued_once_and_claimed_once(tmp_path):
    config = grid()
    storage = make_storage(default_storage_url(tmp_path), config)
    study = open_study(config, storage, "s")
    open_study(config, storage, "s")  # a second worker/open does not queue the grid again
    assert [t.user_attrs[NAME_ATTR] for t in study.get_trials()] == ["a", "b"]
    first, second = claim_waiting(study, storage), claim_waiting(study, storage)
    assert {first.user_attrs[NAME_ATTR], second.user_attrs[NAME_ATTR]} == {"a", "b"}
    assert claim_waiting(study, storage) is None
    with pytest.raises(ConfigError, match="different sweep config"):
        open_study(SweepConfig(trials=[{"name": "a", "beta": 0.3}]), storage, "s")
    with pytest.raises(ConfigError, match="does not exist"):
        open_study(config, storage, "other", create=False)


def test_dead_workers_are_failed_and_requeued(tmp_path):
    config = grid(heartbeat_interval=1, grace_period=1)
    storage = make_storage(default_storage_url(tmp_path), config)
    study = open_study(config, storage, "s")
    local, remote = claim_waiting(study, storage), claim_waiting(study, storage)
    # Same machine, a pid that is not running; another machine that stopped sending heartbeats.
    import socket

    local.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": 2**22 + 7, "started": 0.0})
    remote.set_user_attr(WORKER_ATTR, {"host": "elsewhere", "pid": 1, "started": 0.0})
    storage.record_heartbeat(remote._trial_id)
    assert recover_dead_workers(study, storage, max_retry=2) == 1  # the remote one is still within its grace period
    time.sleep(2.2)
    recover_dead_workers(study, storage, max_retry=2)
    trials = study.get_trials()
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.FAIL]
    assert "died" in trials[0].user_attrs["error"]
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs[NAME_ATTR] for t in retries) == ["a", "b"]
    assert all(WORKER_ATTR not in t.user_attrs and t.user_attrs["overrides"] for t in retries)


def test_storage_password_is_redacted():
    assert redact("postgresql://me:secret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert redact("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"
