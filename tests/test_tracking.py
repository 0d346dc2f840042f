"""Tracking: the system sampler (CPU always, GPU through NVML when present, no GPU is no error), the
tracker defaults, and real MLflow (SQLite store) and W&B (offline) runs read back and compared with
the run's own records."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpolab import tracking
from dpolab.runs import RunFolder
from dpolab.tracking import SystemSampler, env_defaults, sweep_tracker_defaults, tracker_defaults


def test_sampler_without_gpu_records_cpu_and_rss(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "_nvml_handles", lambda: (None, []))
    run = RunFolder.create(tmp_path / "run", {"engine": "dpolab"})
    import time

    with SystemSampler(run, interval_s=0.05) as sampler:
        end = time.monotonic() + 0.3
        while time.monotonic() < end:  # busy: CPU work to sample
            sum(i * i for i in range(1000))
    rows = run.system()
    assert len(rows) >= 3
    cores = os.cpu_count() or 1
    assert all(r["rss_mb"] > 10 and 0 <= r["cpu_percent"] <= 100 * cores and "gpus" not in r for r in rows)
    assert max(r["cpu_percent"] for r in rows) > 10  # the busy loop shows
    assert rows[-1]["time_s"] >= rows[0]["time_s"]
    assert set(sampler.latest()) == {"system/cpu_percent", "system/rss_mb"}


def test_under_torchrun_only_rank_0_records_system_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "_nvml_handles", lambda: (None, []))
    run = RunFolder.create(tmp_path / "run", {"engine": "dpolab"})
    monkeypatch.setenv("RANK", "1")
    with SystemSampler(run, interval_s=0.02) as sampler:
        import time

        time.sleep(0.1)
    assert run.system() == [] and "system/rss_mb" in sampler.latest()  # sampled for its logs, not recorded
    monkeypatch.setenv("RANK", "0")
    with SystemSampler(run, interval_s=0.02):
        pass
    assert len(run.system()) == 1  # the state at the end


class FakeNVML:
    """Two GPUs as NVML reports them (mW, mJ, bytes)."""

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_500 if handle == 0 else 80_000

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=97 if handle == 0 else 5)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=3 * 2**30)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if handle == 1:
            raise RuntimeError("not supported on this GPU")
        return 1_234_000


def test_sampler_with_gpus_records_power_energy_util_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "_nvml_handles", lambda: (FakeNVML(), [0, 1]))
    run = RunFolder.create(tmp_path / "run", {"engine": "dpolab"})
    with SystemSampler(run, interval_s=10) as sampler:
        pass
    gpus = run.system()[-1]["gpus"]
    assert gpus[0] == {"index": 0, "power_w": 250.5, "util_percent": 97, "mem_mb": 3072.0, "energy_j": 1234.0}
    assert gpus[1]["energy_j"] is None and gpus[1]["power_w"] == 80.0
    latest = sampler.latest()
    assert latest["system/gpu0_power_w"] == 250.5 and latest["system/gpu0_energy_j"] == 1234.0
    assert "system/gpu1_energy_j" not in latest and latest["system/gpu1_util_percent"] == 5


def test_tracker_defaults_never_override_the_user(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    defaults = tracker_defaults(["mlflow", "wandb"], tmp_path)
    assert defaults["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    with env_defaults(defaults):
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("mlflow.db")
        assert os.environ["WANDB_DIR"] == str(tmp_path.resolve())
        assert os.environ["WANDB_PROJECT"] == "mine"
    assert "MLFLOW_TRACKING_URI" not in os.environ and os.environ["WANDB_PROJECT"] == "mine"
    group = sweep_tracker_defaults(["wandb", "mlflow"], tmp_path, "my-sweep")
    assert group["WANDB_RUN_GROUP"] == "my-sweep" and group["MLFLOW_EXPERIMENT_NAME"] == "my-sweep"
    assert tracker_defaults([], tmp_path) == {}


def _wandb_history(run_dir: Path) -> list[dict]:
    """History rows of the offline W&B run, read back from its .wandb log with `wandb leet inspect`."""
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    wandb_cli = shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")
    out = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(offline[0])], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def sample_lengths(run: RunFolder) -> dict[int, float]:
    """Mean token length of the policy's samples per evaluation step, from samples.jsonl."""
    steps = sorted({r["step"] for r in run.samples()})
    return {s: sum(r["policy_tokens"] for r in run.samples(step=s)) / len(run.samples(step=s)) for s in steps}


@pytest.mark.slow
def test_mlflow_and_wandb_offline_match_local_records(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    from dpolab.config import TrainConfig
    from dpolab.dpo.trainer import train

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_DIR", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = TrainConfig(model="tiny-gpt2", dataset="hh-rlhf-sample", max_train_pairs=16, max_eval_pairs=8,
                         max_steps=2, per_device_train_batch_size=4, logging_steps=1, eval_steps=1,
                         max_length=128, max_prompt_length=64, report_to=["mlflow", "wandb"],
                         sample_prompts=2, sample_max_new_tokens=8, cache_dir=str(tmp_path / "cache"))
    run = train(config, tmp_path / "run")
    local_eval = {r["step"]: r["loss"] for r in run.metrics("eval")}
    local_train = {r["step"]: r["loss"] for r in run.metrics("train") if "loss" in r}
    assert sorted(local_eval) == [1, 2]

    # MLflow: the default store is a SQLite file in the run folder.
    assert (run.path / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{run.path / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    mlflow_eval = {m.step: m.value for m in client.get_metric_history(run_id, "eval_loss")}
    assert mlflow_eval.keys() == local_eval.keys()
    assert all(math.isclose(mlflow_eval[s], local_eval[s], rel_tol=1e-6) for s in local_eval)
    mlflow_train = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert all(math.isclose(mlflow_train[s], local_train[s], rel_tol=1e-3) for s in local_train)
    assert client.get_metric_history(run_id, "system/cpu_percent"), "system metrics did not reach MLflow"
    # The samples: one table artifact per evaluation, the same rows as samples.jsonl.
    artifacts = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert artifacts == ["samples/step_000001.json", "samples/step_000002.json"]
    table = json.loads(Path(client.download_artifacts(run_id, artifacts[-1], str(tmp_path))).read_text())
    policy_column = [row[table["columns"].index("policy")] for row in table["data"]]
    assert policy_column == [r["policy"] for r in run.samples(step=2)] and len(policy_column) == 2
    drift = sample_lengths(run)
    assert {m.step: m.value for m in client.get_metric_history(run_id, "eval_samples/policy_tokens")} == drift

    # W&B offline: the run lives in the run folder; its history holds the same eval loss.
    history = _wandb_history(run.path)
    wandb_eval = {row["train/global_step"]: row["eval/loss"] for row in history if "eval/loss" in row}
    assert wandb_eval.keys() == local_eval.keys(), history
    assert all(math.isclose(wandb_eval[s], local_eval[s], rel_tol=1e-6) for s in local_eval)
    assert any("train/system/cpu_percent" in row for row in history), "system metrics did not reach W&B"
    tables = {row["train/global_step"]: row for row in history if "samples._type" in row}
    assert sorted(tables) == [1, 2]
    assert all(t["samples._type"] == "table-file" and t["samples.nrows"] == 2 for t in tables.values())
    assert {s: t["eval/samples/policy_tokens"] for s, t in tables.items()} == drift


def test_tensorboard_and_trackio_match_local_records(tmp_path):
    """Both write into the run folder (tensorboard/, trackio/dpolab.db); read back with their own
    readers, the eval loss per step equals the run's metrics.jsonl."""
    import sqlite3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Its own process, as `dpolab train` runs: Trackio fixes its store when first imported, and
    # another test of this session may have imported it already.
    env = {k: v for k, v in os.environ.items() if k not in ("TRACKIO_DIR", "TENSORBOARD_LOGGING_DIR")}
    subprocess.run([sys.executable, "-m", "dpolab.cli", "train", "--config", "configs/tiny.yaml",
                    "--output-dir", str(tmp_path / "run"), "--max-train-pairs", "16", "--max-eval-pairs", "8",
                    "--max-steps", "2", "--per-device-train-batch-size", "4", "--logging-steps", "1",
                    "--eval-steps", "1", "--max-length", "128", "--max-prompt-length", "64",
                    "--report-to", "tensorboard,trackio", "--cache-dir", str(tmp_path / "cache"),
                    "--sample-prompts", "2", "--sample-max-new-tokens", "8"],
                   check=True, env=env, capture_output=True)
    run = RunFolder.open(tmp_path / "run")
    local_eval = {r["step"]: r["loss"] for r in run.metrics("eval")}
    assert sorted(local_eval) == [1, 2]

    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    tensorboard_eval = {e.step: e.value for e in events.Scalars("eval/loss")}
    assert tensorboard_eval == pytest.approx(local_eval, rel=1e-6)
    samples = EventAccumulator(str(run.path / "tensorboard" / "samples"))
    samples.Reload()
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in samples.Tensors("samples/text_summary")}
    assert sorted(texts) == [1, 2]
    assert all(row["prompt"].splitlines()[-1].replace("|", "\\|") in texts[row["step"]] for row in run.samples())
    drift = sample_lengths(run)
    assert {e.step: e.value for e in samples.Scalars("eval/samples/policy_tokens")} == pytest.approx(drift)

    with sqlite3.connect(run.path / "trackio" / "dpolab.db") as db:
        rows = [json.loads(metrics) for (metrics,) in db.execute("SELECT metrics FROM metrics ORDER BY id")]
    trackio_eval = {r["train/global_step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert trackio_eval == pytest.approx(local_eval, rel=1e-6)
    trackio_drift = {r["train/global_step"]: r["eval/samples/policy_tokens"] for r in rows
                     if "eval/samples/policy_tokens" in r}
    assert trackio_drift == drift


def _train_cli(cwd: Path, report_to: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`dpolab train` as a user types it: relative output folder, in ``cwd``, a one-step run."""
    return subprocess.run([sys.executable, "-m", "dpolab.cli", "train", "--config",
                           str(Path(__file__).parents[1] / "configs" / "tiny.yaml"), "--output-dir", "run",
                           "--max-train-pairs", "8", "--max-eval-pairs", "4", "--max-steps", "1",
                           "--per-device-train-batch-size", "4", "--max-length", "64", "--max-prompt-length", "32",
                           "--sample-prompts", "1", "--sample-max-new-tokens", "4", "--report-to", report_to],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wandb_without_login_falls_back_to_offline_in_the_run_folder(tmp_path):
    """No API key, no netrc, no WANDB_MODE, no terminal: W&B used to raise "No API key configured"
    after the data was prepared. The run now logs offline into RUN/wandb/ and says so in one line."""
    pytest.importorskip("wandb")
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"), XDG_CONFIG_HOME=str(home / ".config"),
               WANDB_CONFIG_DIR=str(home / ".config" / "wandb"), WANDB_SILENT="true",
               PYTHONPATH=os.pathsep.join(sys.path))
    result = _train_cli(work, "wandb", env)
    assert result.returncode == 0, result.stderr[-3000:]
    offline = [line for line in result.stderr.splitlines() if "no API key or login found" in line]
    assert len(offline) == 1, result.stderr[-3000:]
    runs = list((work / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((work / "run").iterdir())
    assert sorted(p.name for p in work.iterdir()) == ["run"]


def test_mlflow_writes_nothing_outside_the_run_folder(tmp_path):
    """MLflow's SQLite store kept its artifacts (the samples tables) in ./mlruns of the working
    directory; they belong in the run folder with the rest of the run's records."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    result = _train_cli(tmp_path, "mlflow", env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    run_dir = (tmp_path / "run").resolve()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(run_dir), run.info.artifact_uri
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/step_000001.json"]
