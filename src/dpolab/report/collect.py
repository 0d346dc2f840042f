"""What a report shows, read from the records only (``dpolab.runs``): one entry per trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpolab.errors import RunFolderError
from dpolab.runs import RunFolder, SweepFolder, read_json


@dataclass
class TrialRecords:
    """One configuration: its config, final summary (None unless it finished) and time series."""

    name: str
    state: str                       # complete | pruned | fail | running | (single run) complete
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    system: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    is_best: bool = False
    samples: list[dict[str, Any]] = field(default_factory=list)  # the latest evaluation's (sample_prompts > 0)

    @property
    def finished(self) -> bool:
        return self.summary is not None and self.state == "complete"


@dataclass
class ReportData:
    title: str
    path: Path
    kind: str                        # "sweep" | "run"
    trials: list[TrialRecords]
    info: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    sft: TrialRecords | None = None  # the SFT run the DPO trials started from (the recipe's stage 1)


def _read_run(path: Path, name: str, state: str) -> TrialRecords:
    run = RunFolder(path)
    record = TrialRecords(name=name, state=state)
    if run.config_path.is_file():
        record.config = run.config() or {}
    if run.summary_path.is_file():
        record.summary = run.summary()
    record.train = [r for r in run.metrics("train") if "loss" in r]
    record.eval = run.metrics("eval")
    record.system = run.system()
    record.samples = run.samples(step=-1)
    return record


def _sft_stage(trials: list[TrialRecords]) -> TrialRecords | None:
    """The SFT run the trials' ``model`` names, when it is one (SFT -> DPO)."""
    for model in {str(t.config.get("model")) for t in trials if t.config.get("model")}:
        if RunFolder.is_run(model) and RunFolder(Path(model)).info().get("stage") == "sft":
            return _read_run(Path(model), RunFolder(Path(model)).info().get("name", Path(model).name), "complete")
    return None


def collect(path: str | Path) -> ReportData:
    """Records of a sweep folder (every trial, failed ones included) or of a single run folder."""
    data = _collect(path)
    data.sft = _sft_stage(data.trials)
    return data


def _collect(path: str | Path) -> ReportData:
    path = Path(path)
    if SweepFolder.is_sweep(path):
        sweep = SweepFolder.open(path)
        info = sweep.info()
        best = sweep.best() if sweep.best_json.exists() else None
        trials = []
        entries = []
        for trial_dir in sorted(sweep.trials_dir.iterdir()) if sweep.trials_dir.is_dir() else []:
            status = read_json(trial_dir / "trial.json") if (trial_dir / "trial.json").is_file() else {}
            if not status and not RunFolder.is_run(trial_dir):
                continue
            entries.append((status.get("optuna_trial", 10**9), trial_dir.name, trial_dir, status))
        for _, name, trial_dir, status in sorted(entries):
            state = status.get("state") or ("complete" if (trial_dir / "summary.json").is_file() else "running")
            record = _read_run(trial_dir, name, state)
            record.error = status.get("error")
            if not record.config and status.get("overrides"):
                # Failed before its run folder was written: show what it was asked to try.
                record.config = dict(status["overrides"])
            record.is_best = best is not None and best.get("trial") == name
            trials.append(record)
        return ReportData(title=f"Sweep {info.get('name', path.name)}", path=path, kind="sweep",
                          trials=trials, info=info, best=best)
    if RunFolder.is_run(path):
        info = RunFolder.open(path).info()
        record = _read_run(path, info.get("name", path.name), "complete" if (path / "summary.json").is_file()
                           else "running")
        record.is_best = record.finished
        return ReportData(title=f"Run {record.name}", path=path, kind="run", trials=[record], info=info)
    raise RunFolderError(f"{path}: not a dpolab run or sweep folder")
