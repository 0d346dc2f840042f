"""The sweep configuration: one documented dataclass, loaded from ``configs/sweep-*.yaml``.

Two modes share one file format:

* ``grid``: a fixed list of configurations (``trials``), optionally crossed with a cartesian
  product of values (``grid``). The default is a three-row table (learning rate 5e-5
  or 1e-4, batch 3 or 4, weight decay 0.01 or 0.005, 2 epochs each).
* ``search``: Optuna TPE over ``search_space`` ranges with a trial budget (``n_trials``) and
  median pruning on the intermediate eval loss.

Every trial is ``base`` + its own overrides, validated as a :class:`~dpolab.config.TrainConfig`
when the trial starts (so one bad trial fails alone; unknown keys fail the whole sweep at load).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dpolab.config import TrainConfig, read_yaml
from dpolab.errors import ConfigError

Mode = Literal["grid", "search"]
Direction = Literal["minimize", "maximize"]

# The default grid, 2 epochs each: lr 5e-5 / batch 3 / wd 0.01; then a higher learning rate; then a
# larger batch with less weight decay.
ORIGINAL_TABLE: list[dict[str, Any]] = [
    {"name": "lr5e-5-b3-wd0.01", "learning_rate": 5e-5, "per_device_train_batch_size": 3,
     "weight_decay": 0.01, "num_train_epochs": 2},
    {"name": "lr1e-4-b3-wd0.01", "learning_rate": 1e-4, "per_device_train_batch_size": 3,
     "weight_decay": 0.01, "num_train_epochs": 2},
    {"name": "lr5e-5-b4-wd0.005", "learning_rate": 5e-5, "per_device_train_batch_size": 4,
     "weight_decay": 0.005, "num_train_epochs": 2},
]

# Search ranges when none are given: the four settings DPO results are most sensitive to.
DEFAULT_SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
    "beta": {"low": 0.05, "high": 0.5},
    "weight_decay": {"low": 0.0, "high": 0.05},
    "per_device_train_batch_size": {"choices": [2, 4, 8]},
}

# Keys of a trial entry that are not TrainConfig fields.
TRIAL_META_KEYS = {"name"}


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class SweepConfig:
    """A hyper-parameter study. Field docs follow ``name (type, default): meaning``."""

    name: str | None = field(default=None, metadata=_doc(
        "(str | None, None): Optuna study name and tracker group (W&B group, MLflow experiment); "
        "default: the sweep folder's name."))
    mode: Mode = field(default="grid", metadata=_doc("(str, 'grid'): 'grid' or 'search' (Optuna TPE)."))
    base: dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "(dict, {}): TrainConfig fields shared by every trial (model, dataset, max_steps, ...)."))
    base_config: str | None = field(default=None, metadata=_doc(
        "(str | None, None): a train YAML (configs/*.yaml) read first; ``base`` overrides it. "
        "Relative paths are resolved from the sweep YAML's folder."))
    trials: list[dict[str, Any]] = field(default_factory=lambda: [dict(t) for t in ORIGINAL_TABLE], metadata=_doc(
        "(list[dict], the original table): grid mode: one dict of TrainConfig overrides per "
        "configuration, with an optional 'name' (the trial folder); set [] to use only ``grid``."))
    grid: dict[str, list[Any]] = field(default_factory=dict, metadata=_doc(
        "(dict[str, list], {}): grid mode: values to cross (cartesian product); each listed trial is "
        "crossed with it."))
    search_space: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        k: dict(v) for k, v in DEFAULT_SEARCH_SPACE.items()}, metadata=_doc(
        "(dict, lr/beta/weight decay/batch): search mode: field -> {low, high, log?} (float; int "
        "when both bounds are ints) or {choices: [...]}."))
    n_trials: int = field(default=20, metadata=_doc(
        "(int, 20): search mode: trial budget of the whole study, all workers together."))
    objective: str = field(default="eval/loss", metadata=_doc(
        "(str, 'eval/loss'): what to optimise: 'eval/<metric>' (final eval, e.g. eval/rewards/accuracies, "
        "or eval/rewards/accuracies_length_balanced with direction 'maximize' to judge configurations by what "
        "they learned beyond answer length) or a top-level summary.json number (e.g. pairs_per_s)."))
    direction: Direction = field(default="minimize", metadata=_doc("(str, 'minimize'): or 'maximize'."))
    pruning: bool | None = field(default=None, metadata=_doc(
        "(bool | None, None): median pruning on intermediate eval values; None = on in search, off in "
        "grid (a grid should finish every row)."))
    pruner_startup_trials: int = field(default=2, metadata=_doc(
        "(int, 2): trials that run unpruned before the median pruner may stop any."))
    pruner_warmup_steps: int = field(default=0, metadata=_doc(
        "(int, 0): optimizer steps before a trial may be pruned."))
    sampler_seed: int = field(default=0, metadata=_doc("(int, 0): seed of the TPE sampler."))
    heartbeat_interval: int = field(default=30, metadata=_doc(
        "(int, 30): seconds between a running trial's heartbeats in the study storage."))
    grace_period: int = field(default=120, metadata=_doc(
        "(int, 120): a RUNNING trial with no heartbeat for this long is failed and re-queued (a worker "
        "on another machine died). Dead workers on this machine are detected at once."))
    max_retry: int = field(default=2, metadata=_doc(
        "(int, 2): times a trial whose worker died is queued again; after that it is recorded as "
        "failed (a trial that kills its worker every time must not be retried forever)."))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.mode not in ("grid", "search"):
            raise ConfigError(f"sweep: mode must be 'grid' or 'search', got {self.mode!r}")
        if self.max_retry < 0:
            raise ConfigError(f"sweep: max_retry must be >= 0, got {self.max_retry!r}")
        if self.direction not in ("minimize", "maximize"):
            raise ConfigError(f"sweep: direction must be 'minimize' or 'maximize', got {self.direction!r}")
        known = set(TrainConfig.field_names())
        self._check_keys(self.base, known, "base")
        for i, trial in enumerate(self.trials):
            if not isinstance(trial, dict):
                raise ConfigError(f"sweep: trials[{i}] must be a mapping of TrainConfig overrides")
            self._check_keys(trial, known | TRIAL_META_KEYS, f"trials[{i}]")
        self._check_keys(self.grid, known, "grid")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep: grid.{key} must be a non-empty list of values")
        self._check_keys(self.search_space, known, "search_space")
        for key, spec in self.search_space.items():
            if not isinstance(spec, dict) or not ("choices" in spec or {"low", "high"} <= set(spec)):
                raise ConfigError(f"sweep: search_space.{key} needs 'low' and 'high', or 'choices'")
            if "choices" not in spec and not spec["low"] < spec["high"]:
                raise ConfigError(f"sweep: search_space.{key}: low must be < high")
        if self.mode == "grid" and not self.trials and not self.grid:
            raise ConfigError("sweep: grid mode needs 'trials' or 'grid'")
        if self.mode == "search" and (not self.search_space or self.n_trials <= 0):
            raise ConfigError("sweep: search mode needs a search_space and n_trials > 0")
        names = [t["name"] for t in self.grid_points()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"sweep: trial names must be unique, repeated: {', '.join(duplicates)}")

    @staticmethod
    def _check_keys(values: dict[str, Any], known: set[str], where: str) -> None:
        for key in values:
            if key not in known:
                raise ConfigError(f"sweep: {where}: unknown TrainConfig key {key!r}")

    @property
    def use_pruning(self) -> bool:
        return self.mode == "search" if self.pruning is None else self.pruning

    def grid_points(self) -> list[dict[str, Any]]:
        """Grid mode: every configuration as ``{"name", **overrides}``, in a stable order."""
        if self.mode != "grid":
            return []
        rows = [dict(t) for t in self.trials] or [{}]
        keys = list(self.grid)
        points = []
        combinations = list(itertools.product(*(self.grid[k] for k in keys))) if keys else [()]
        for row in rows:
            for j, values in enumerate(combinations):
                point = {**row, **dict(zip(keys, values, strict=True))}
                if "name" in row and len(combinations) > 1:
                    point["name"] = f"{row['name']}-{j:03d}"
                points.append(point)
        for i, point in enumerate(points):
            if "name" not in point:
                point["name"] = f"trial-{i:03d}"
            point["name"] = str(point["name"])
        return points

    def train_values(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """``base`` + one trial's overrides (meta keys removed): the input of TrainConfig.from_dict."""
        return {**self.base, **{k: v for k, v in overrides.items() if k not in TRIAL_META_KEYS}}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_sweep_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """A sweep YAML (optional: no file = the original table on the defaults) -> :class:`SweepConfig`."""
    values: dict[str, Any] = read_yaml(path) if path else {}
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(SweepConfig)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{path or 'sweep'}: unknown sweep key {key!r} (known: {', '.join(sorted(known))})")
    base_config = values.get("base_config")
    if base_config:
        base_path = Path(base_config)
        if path and not base_path.is_absolute() and not base_path.exists():
            base_path = Path(path).parent / base_path
        values["base"] = {**read_yaml(base_path), **(values.get("base") or {})}
        values["base_config"] = str(base_path)
    for key in ("base", "grid", "search_space"):
        if values.get(key) is None:
            values.pop(key, None)
    return SweepConfig(**values)
