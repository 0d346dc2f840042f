"""The command-line options of every training command (``dpolab train``, ``dpolab sft``).

The options are generated from :class:`~dpolab.config.TrainConfig` by ``transformers``'
``HfArgumentParser`` (type, choices and help come from each field), so ``--help`` lists every
field and argparse converts the values. A field given on the command line wins over the YAML;
one not given keeps the YAML's value, else the field's default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import typing
from typing import Any

from dpolab.config import TrainConfig, load_config
from dpolab.paths import resolve_config_paths, user_path


def config_options() -> argparse.ArgumentParser:
    """A parent parser with ``--field`` / ``--field-name`` for every TrainConfig field. Its defaults
    are suppressed: only what the user typed reaches the namespace (and overrides the YAML)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainConfig, add_help=False)
    fields = set(TrainConfig.field_names())
    # Per action, not set_defaults(): that would also put the SUPPRESS marker into the namespace.
    for action in parser._actions:
        if action.dest in fields:
            action.default = argparse.SUPPRESS
    return parser


# The fields of the preference objective: what `dpolab evaluate` and `dpolab sweep` take too.
LOSS_FIELDS = ("loss_type", "loss_weights", "beta", "label_smoothing", "rpo_alpha", "ld_alpha", "use_weighting",
               "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "rdpo_alpha", "simpo_gamma")


def loss_options() -> argparse.ArgumentParser:
    """A parent parser with the options of :data:`LOSS_FIELDS` only, built as :func:`config_options`
    builds all of them (same types, choices and help); defaults suppressed likewise."""
    from transformers import HfArgumentParser

    parser = argparse.ArgumentParser(add_help=False)
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in LOSS_FIELDS:
            field = copy.copy(field)  # HfArgumentParser narrows .type in place
            field.type = hints[field.name]
            HfArgumentParser._parse_dataclass_field(parser, field)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, func: Any, default_name: str, config_hint: str) -> None:
    """--config / --output-dir / --resume and the accepted option names of a training command."""
    parser.add_argument("--config", type=user_path, help=f"YAML config file ({config_hint})")
    parser.add_argument("--output-dir", type=user_path, help=f"run folder (default: runs/<config name or '{default_name}'>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.set_defaults(func=func, known_options=[*TrainConfig.field_names(), "config", "output_dir", "resume"])


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line, as argparse typed them."""
    overrides = {name: getattr(args, name) for name in TrainConfig.field_names() if hasattr(args, name)}
    if "report_to" in overrides:  # `--report-to wandb,mlflow` as well as `--report-to wandb mlflow`; `none` clears
        overrides["report_to"] = [t for v in overrides["report_to"] for t in v.split(",") if t and t != "none"]
    return overrides


def throughput(summary: dict[str, Any]) -> str:
    """``"bf16 | 1.27 pairs/s"``: the precision the run trained in and this session's speed."""
    speed = f"{summary['pairs_per_s']} pairs/s" if summary.get("pairs_per_s") else "no steps trained in this session"
    return f"{summary.get('dtype', '?')} | {speed}"


def config_from(args: argparse.Namespace, **fixed: Any) -> TrainConfig:
    """The command's validated config: the --config YAML, the fields given on the command line (they
    win), then ``fixed`` (what the command itself sets); local paths made absolute."""
    config = load_config(args.config, {**overrides_from(args), **fixed})
    return dataclasses.replace(config, **resolve_config_paths(config.to_dict()))
