"""What a report shows, read from the records only (``dpolab.runs``): one entry per trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpolab.errors import RunFolderError
from dpolab.runs import RunFolder, SweepFolder
from dpolab.samples import LENGTH_METRICS, mean_lengths


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
    resolved: dict[str, Any] = field(default_factory=dict)  # run.json's resolved settings (dtype, device, ...)
    eval_pairs: list[dict[str, Any]] = field(default_factory=list)  # final evaluation: margin, lengths per pair
    sample_lengths: list[dict[str, Any]] = field(default_factory=list)  # per evaluation: step + mean sample tokens

    @property
    def finished(self) -> bool:
        return self.summary is not None and self.state == "complete"


@dataclass
class ReportData:
    title: str
    folder: RunFolder | SweepFolder
    kind: str                        # "sweep" | "run"
    trials: list[TrialRecords]
    info: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    sft: TrialRecords | None = None  # the SFT run the DPO trials started from (the recipe's stage 1)

    @property
    def path(self) -> Path:
        return self.folder.path


def _read_run(run: RunFolder, name: str, state: str) -> TrialRecords:
    record = TrialRecords(name=name, state=state)
    if run.config_path.is_file():
        record.config = run.config() or {}
    if run.is_finished():
        record.summary = run.summary()
    record.train = [r for r in run.metrics("train") if "loss" in r]
    record.eval = run.metrics("eval")
    record.system = run.system()
    record.samples = run.samples(step=-1)
    if run.identity_path.is_file():
        record.resolved = run.resolved()
    record.eval_pairs = run.eval_pairs()
    record.sample_lengths = _sample_lengths(run.samples())
    return record


def _sample_lengths(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[{"step", "samples/policy_tokens", "samples/reference_tokens"}]`` per evaluation, in step
    order (rows recorded before samples counted tokens are left out)."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        if all(key in row for key in LENGTH_METRICS):
            by_step.setdefault(row["step"], []).append(row)
    return [{"step": step, **mean_lengths(group)} for step, group in sorted(by_step.items())]


def _sft_stage(trials: list[TrialRecords]) -> TrialRecords | None:
    """The SFT run the trials' ``model`` names, when it is one (SFT -> DPO)."""
    for model in {str(t.config.get("model")) for t in trials if t.config.get("model")}:
        if not RunFolder.is_run(model):
            continue
        run = RunFolder.open(model)
        info = run.info()
        if info.get("stage") == "sft":
            return _read_run(run, info.get("name", run.path.name), "complete")
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
        best = sweep.best() if sweep.has_best() else None
        entries = []
        for name in sweep.trial_names():
            run, status = sweep.trial_run(name), sweep.trial_record(name) or {}
            if status or RunFolder.is_run(run.path):
                entries.append((status.get("optuna_trial", 10**9), name, run, status))
        trials = []
        for _, name, run, status in sorted(entries, key=lambda e: e[:2]):
            record = _read_run(run, name, status.get("state") or ("complete" if run.is_finished() else "running"))
            record.error = status.get("error")
            if not record.config and status.get("overrides"):
                # Failed before its run folder was written: show what it was asked to try.
                record.config = dict(status["overrides"])
            record.is_best = best is not None and best.get("trial") == name
            trials.append(record)
        return ReportData(title=f"Sweep {info.get('name', path.name)}", folder=sweep, kind="sweep",
                          trials=trials, info=info, best=best)
    if RunFolder.is_run(path):
        run = RunFolder.open(path)
        if not run.is_finished() and not run.metrics():
            raise RunFolderError(f"{path}: nothing to report: the run has logged no training step yet "
                                 "(still starting, or its start failed)")
        info = run.info()
        record = _read_run(run, info.get("name", path.name), "complete" if run.is_finished() else "running")
        record.is_best = record.finished
        return ReportData(title=f"Run {record.name}", folder=run, kind="run", trials=[record], info=info)
    raise RunFolderError(f"{path}: not a dpolab run or sweep folder")
