"""The run folder contract: the one module that knows where each record lives.

Training writes a *run folder*; a sweep writes a *sweep folder* whose trials are run folders.
The sweep, report, export and web app read them only through this module. Layout and every
file's schema: ``docs/run-folder.md``. Bump ``RUN_FORMAT`` / ``SWEEP_FORMAT`` on any
incompatible change.

    runs/my-run/
      run.json           {"format": "dpolab.run/1", "name", "engine", "base_model", "dataset", ...}
      config.yaml        resolved TrainConfig
      data_report.json   rows read / kept / dropped per reason, per split
      metrics.jsonl      one JSON object per train log or eval (split = "train" | "eval")
      system.jsonl       system samples (CPU %, RSS, GPU W/J/util/mem when present)
      summary.json       final train + eval metrics, wall time, pairs/s
      model/             final model in HF format (safetensors, tokenizer, generation config)
      checkpoints/       Trainer checkpoints for --resume
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

from dpolab.errors import RunFolderError

RUN_FORMAT = "dpolab.run/1"
SWEEP_FORMAT = "dpolab.sweep/1"


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file. The temp
    name is per process: under torchrun every rank may write the same record at once."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def default_file_mode() -> int:
    """The mode a new file gets here (0o644 under the usual umask 022), read without changing the
    umask (``os.umask`` sets it process-wide, racing with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def give_default_modes(folder: Path) -> None:
    """safetensors writes its files 0600 (owner-only); give every file in ``folder`` the mode every
    other record of a run has, so a model is as readable as its config (other users, a web server)."""
    mode = default_file_mode()
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    # One write() of one line: appends from one process never interleave.
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def read_appended_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a record that is only ever appended to (metrics, system samples, generations):
    tolerant of the torn last line a kill leaves, unlike the data loader's strict reader."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # A run killed mid-write may leave one torn last line; everything before it is good.
                break
    return rows


@dataclass(frozen=True)
class _RecordFolder:
    """What run and sweep folders share: an identity file (``run.json`` / ``sweep.json``) whose
    ``format`` says which contract the folder follows."""

    path: Path

    KIND: ClassVar[str]
    IDENTITY: ClassVar[str]
    FORMAT: ClassVar[str]

    @property
    def identity_path(self) -> Path:
        return self.path / self.IDENTITY

    @property
    def report_dir(self) -> Path:
        """Where ``dpolab report`` writes (plots, table, report.html)."""
        return self.path / "report"

    @classmethod
    def create(cls, path: str | Path, info: dict[str, Any]) -> Self:
        """Make (or reuse, for a resume) the folder and write its identity file."""
        folder = cls(Path(path))
        if folder.path.exists() and not folder.path.is_dir():
            raise RunFolderError(f"{folder.path}: exists and is not a folder; choose another output folder")
        folder.path.mkdir(parents=True, exist_ok=True)
        write_json(folder.identity_path, {"format": cls.FORMAT, "name": folder.path.name, **info})
        return folder

    @classmethod
    def open(cls, path: str | Path) -> Self:
        folder = cls(Path(path))
        info = read_json(folder.identity_path) if folder.identity_path.exists() else None
        if not info or info.get("format") != cls.FORMAT:
            raise RunFolderError(f"{folder.path}: not a dpolab {cls.KIND} folder "
                                 f"(no {cls.IDENTITY} with format {cls.FORMAT})")
        return folder

    @classmethod
    def is_folder(cls, path: str | Path) -> bool:
        return (Path(path) / cls.IDENTITY).is_file()

    def info(self) -> dict[str, Any]:
        return read_json(self.identity_path)

    def update_info(self, **values: Any) -> None:
        write_json(self.identity_path, {**self.info(), **values})


@dataclass(frozen=True)
class RunFolder(_RecordFolder):
    """One training run's records. Create with :meth:`create`, read with :meth:`open`."""

    KIND: ClassVar[str] = "run"
    IDENTITY: ClassVar[str] = "run.json"
    FORMAT: ClassVar[str] = RUN_FORMAT

    config_path = property(lambda self: self.path / "config.yaml")
    data_report_path = property(lambda self: self.path / "data_report.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    system_path = property(lambda self: self.path / "system.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    model_dir = property(lambda self: self.path / "model")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    evaluation_dir = property(lambda self: self.path / "evaluation")  # written by `dpolab evaluate`
    adapter_dir = property(lambda self: self.path / "adapter")  # LoRA runs only: the PEFT adapter
    samples_path = property(lambda self: self.path / "samples.jsonl")  # only with sample_prompts > 0
    eval_pairs_path = property(lambda self: self.path / "eval_pairs.jsonl")  # DPO: the latest evaluation's pairs

    @classmethod
    def is_run(cls, path: str | Path) -> bool:
        return cls.is_folder(path)

    def config(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_path.read_text())

    def resolved(self) -> dict[str, Any]:
        """How the run actually ran (``run.json``'s ``resolved`` block: device, dtype, reference,
        template, data key, ...), what every later stage reads; {} for a run recorded before it existed."""
        return self.info().get("resolved") or {}

    def reference_model(self) -> str | None:
        """The frozen reference the run trained against (None: SFT, or a reference-free loss)."""
        reference = self.resolved().get("reference") or {}
        if self.resolved():
            return reference.get("model")
        return self.info().get("reference_model")

    def data_report(self) -> dict[str, Any]:
        return read_json(self.data_report_path)

    def metrics(self, split: str | None = None) -> list[dict[str, Any]]:
        rows = read_appended_jsonl(self.metrics_path)
        return [r for r in rows if split is None or r.get("split") == split]

    def system(self) -> list[dict[str, Any]]:
        return read_appended_jsonl(self.system_path)

    def summary(self) -> dict[str, Any]:
        return read_json(self.summary_path)

    def has_model(self) -> bool:
        return (self.model_dir / "config.json").is_file()

    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file()

    def is_finished(self) -> bool:
        """``summary.json`` is written last: its presence means training finished."""
        return self.summary_path.is_file()

    def checkpoints(self) -> list[Path]:
        """Trainer's ``checkpoint-STEP`` folders, newest (highest step) first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)

    def append_metrics(self, row: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, row)

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` (a resume drops the rows logged after its checkpoint)."""
        tmp = self.metrics_path.with_name(f"{self.metrics_path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_path)

    def append_system(self, row: dict[str, Any]) -> None:
        append_jsonl(self.system_path, row)

    def samples(self, step: int | None = None) -> list[dict[str, Any]]:
        """Sample rows (all, or one evaluation's); ``step=-1``: the latest evaluation's."""
        rows = read_appended_jsonl(self.samples_path)
        if step == -1 and rows:
            step = rows[-1]["step"]
        return [r for r in rows if step is None or r["step"] == step]

    def append_samples(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            append_jsonl(self.samples_path, row)

    def eval_pairs(self) -> list[dict[str, Any]]:
        """Per held-out pair of the latest evaluation: margin and answer lengths ([] when not recorded)."""
        return read_appended_jsonl(self.eval_pairs_path)

    def write_eval_pairs(self, rows: list[dict[str, Any]]) -> None:
        """Replace ``eval_pairs.jsonl`` with one evaluation's rows (atomically: a reader never sees two)."""
        tmp = self.eval_pairs_path.with_name(f"{self.eval_pairs_path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.eval_pairs_path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, {"format": RUN_FORMAT, **summary})

    def write_data_report(self, report: dict[str, Any]) -> None:
        write_json(self.data_report_path, report)


@dataclass(frozen=True)
class SweepFolder(_RecordFolder):
    """A sweep: ``sweep.json``, ``study.db`` (Optuna, SQLite default), ``trials/<name>/`` run
    folders, and ``best.json`` naming the best trial and the stable path of its model."""

    KIND: ClassVar[str] = "sweep"
    IDENTITY: ClassVar[str] = "sweep.json"
    FORMAT: ClassVar[str] = SWEEP_FORMAT

    sweep_json = property(lambda self: self.path / "sweep.json")
    trials_dir = property(lambda self: self.path / "trials")
    best_json = property(lambda self: self.path / "best.json")
    study_db = property(lambda self: self.path / "study.db")

    @classmethod
    def create(cls, path: str | Path, info: dict[str, Any]) -> SweepFolder:
        sweep = super().create(path, info)
        sweep.trials_dir.mkdir(exist_ok=True)
        return sweep

    @classmethod
    def is_sweep(cls, path: str | Path) -> bool:
        return cls.is_folder(path)

    def trial_dir(self, name: str) -> Path:
        return self.trials_dir / name

    def trial_run(self, name: str) -> RunFolder:
        """The trial's run folder (it may not be a complete run yet)."""
        return RunFolder(self.trial_dir(name))

    def trial_names(self) -> list[str]:
        """Every trial folder (finished or not), in name order."""
        return sorted(p.name for p in self.trials_dir.iterdir() if p.is_dir()) if self.trials_dir.is_dir() else []

    def trials(self) -> list[RunFolder]:
        """Trial run folders that finished (have a summary), in name order."""
        runs = [self.trial_run(name) for name in self.trial_names()]
        return [run for run in runs if RunFolder.is_run(run.path) and run.is_finished()]

    def trial_record(self, name: str) -> dict[str, Any] | None:
        """``trials/NAME/trial.json``: how the trial ended (state, value, error), or None before it did."""
        path = self.trial_dir(name) / "trial.json"
        return read_json(path) if path.is_file() else None

    def trial_records(self) -> list[dict[str, Any]]:
        """Every trial's ``trial.json`` that exists, in name order."""
        return [r for r in map(self.trial_record, self.trial_names()) if r is not None]

    def write_trial_record(self, name: str, record: dict[str, Any]) -> None:
        self.trial_dir(name).mkdir(parents=True, exist_ok=True)
        write_json(self.trial_dir(name) / "trial.json", record)

    def has_best(self) -> bool:
        """``best.json`` exists: at least one trial finished."""
        return self.best_json.is_file()

    def best(self) -> dict[str, Any]:
        return read_json(self.best_json)

    def best_run(self) -> RunFolder:
        return RunFolder.open(self.path / self.best()["run_dir"])

    def write_best(self, best: dict[str, Any]) -> None:
        write_json(self.best_json, {"format": SWEEP_FORMAT, **best})


def is_model_folder(path: str | Path) -> bool:
    """An HF model folder (an export, or a run's ``model/``)."""
    return (Path(path) / "config.json").is_file()


def resolve_run(path: str | Path) -> RunFolder:
    """The run behind a run or sweep folder (a sweep's best trial)."""
    path = Path(path)
    if SweepFolder.is_sweep(path):
        sweep = SweepFolder.open(path)
        if not sweep.has_best():
            raise RunFolderError(f"{path}: sweep has no best.json yet (no trial finished)")
        return sweep.best_run()
    return RunFolder.open(path)


def resolve_model_dir(path: str | Path) -> Path:
    """The HF model folder behind a run folder, a sweep folder (its best trial) or an export."""
    path = Path(path)
    if SweepFolder.is_sweep(path) or RunFolder.is_run(path):
        run = resolve_run(path)
        if not run.has_model():
            raise RunFolderError(f"{run.path}: run has no final model yet (training unfinished?)")
        return run.model_dir
    if is_model_folder(path):
        return path
    raise RunFolderError(f"{path}: not a dpolab run, sweep or model folder")


def latest_result(root: str | Path = "runs") -> Path | None:
    """The most recently finished run or sweep under ``root`` (what `dpolab serve` shows by default)."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = []
    for child in root.iterdir():
        if SweepFolder.is_sweep(child) and SweepFolder(child).has_best():
            candidates.append((SweepFolder(child).best_json.stat().st_mtime, child))
        elif RunFolder.is_run(child) and RunFolder(child).is_finished():
            candidates.append((RunFolder(child).summary_path.stat().st_mtime, child))
    return max(candidates)[1] if candidates else None
