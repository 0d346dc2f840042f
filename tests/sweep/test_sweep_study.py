"""Study bookkeeping without training: grid queueing, atomic claims, recovery of trials whose worker
died (same machine: dead pid at once; another machine: heartbeat older than the grace period)."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import optuna
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
    trial_id,
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
    storage.record_heartbeat(trial_id(study, storage, remote.number))
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


def test_the_sweep_reads_no_private_attribute_of_other_objects():
    """Optuna's ``trial._trial_id`` (and any ``x._name`` of an object not our own) is not API: an
    Optuna release may rename it. Only ``self._name`` / ``cls._name`` may be read (and a module's
    private class in a type hint, such as ``argparse._SubParsersAction``)."""
    private = []
    for path in sorted((Path(__file__).resolve().parents[2] / "src" / "dpolab" / "sweep").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names}
        private += [f"{path.name}:{node.lineno}: .{node.attr}" for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls", *modules})]
    assert private == []


def test_best_json_is_rewritten_only_when_it_is_not_json(tmp_path, monkeypatch):
    """update_best rewrites a best.json that is not valid JSON; any other failure to read it (here
    a permission error) is raised, not swallowed as an ``except Exception: pass`` did."""
    from dpolab.runs import SweepFolder
    from dpolab.sweep.runner import update_best

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={NAME_ATTR: "a"}))
    sweep = SweepFolder.create(tmp_path / "sweep", {"mode": "grid"})
    sweep.best_json.write_text("{not json")
    assert update_best(study, grid(), sweep)["trial"] == "a" and sweep.best()["trial"] == "a"

    real_read_text = Path.read_text

    def unreadable(path, *args, **kwargs):
        if path.name == "best.json":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(PermissionError):
        update_best(study, grid(), sweep)
