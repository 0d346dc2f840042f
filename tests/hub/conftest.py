"""Fixtures for the publishing tests: a finished tiny run, a sweep around it, its export, and the
stand-in Hub server."""

from __future__ import annotations

import pytest

from dpolab.runs import RunFolder, SweepFolder
from tests.hub.factory import BETAS, EVALS, PNG, make_run


@pytest.fixture(scope="session")
def hub_run(tmp_path_factory) -> RunFolder:
    """A finished single run (no sweep, no report)."""
    return make_run(tmp_path_factory.mktemp("run") / "tiny-run", EVALS["trial-001"])


@pytest.fixture(scope="session")
def hub_sweep(tmp_path_factory) -> SweepFolder:
    """A two-trial sweep whose best trial is ``trial-001``, with a ``dpolab report`` folder."""
    sweep = SweepFolder.create(tmp_path_factory.mktemp("sweep") / "demo-sweep",
                               {"mode": "grid", "objective": "eval loss", "direction": "minimize"})
    for name, metrics in EVALS.items():
        # Both trials have a model, with different weights, so exporting the wrong one is caught.
        make_run(sweep.trial_dir(name), metrics, beta=BETAS[name], judged=name == "trial-001",
                 shift=0.0 if name == "trial-001" else 0.01)
    sweep.write_best({"trial": "trial-001", "run_dir": "trials/trial-001", "model_dir": "trials/trial-001/model",
                      "objective": "eval loss", "value": EVALS["trial-001"]["loss"]})
    sweep.report_dir.mkdir()
    (sweep.report_dir / "table.md").write_text("| trial | beta | eval loss |\n|---|---|---|\n"
                                               "| trial-000 | 0.1 | 0.6812 |\n| trial-001 | 0.3 | 0.6543 |\n")
    (sweep.report_dir / "loss.png").write_bytes(PNG)
    (sweep.report_dir / "rewards.png").write_bytes(PNG)
    return sweep


@pytest.fixture(scope="session")
def sweep_export(hub_sweep, tmp_path_factory):
    """The sweep exported once (export costs ~1 s; several tests read it)."""
    from dpolab.hub.export import export

    return export(hub_sweep.path, tmp_path_factory.mktemp("export") / "out")


@pytest.fixture()
def fake_hub(monkeypatch):
    """The stand-in Hub (see fake_hub.py: the real Hub is unreachable here), with HF_ENDPOINT and a
    valid HF_TOKEN pointing at it. Xet is switched off: its chunk store speaks a binary protocol
    to a separate CAS server that this stand-in does not implement; the Hub's LFS path (which
    huggingface_hub uses whenever hf_xet is absent) carries the weights instead."""
    import huggingface_hub.constants as hub_constants

    from tests.hub.fake_hub import FakeHub

    hub = FakeHub(token="hf_test_write_token").start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    # tests/conftest.py sets HF_HUB_OFFLINE=1 so nothing reaches the real Hub; this server is local.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.stop()
