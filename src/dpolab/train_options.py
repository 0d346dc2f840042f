"""The command-line options of every training command (``dpolab train``, ``dpolab sft``).

The options are generated from :class:`~dpolab.config.TrainConfig` by ``transformers``'
``HfArgumentParser`` (type, choices and help come from each field), so ``--help`` lists every
field and argparse converts the values. A field given on the command line wins over the YAML;
one not given keeps the YAML's value, else the field's default.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def config_from(args: argparse.Namespace, **fixed: Any) -> TrainConfig:
    """The command's validated config: the --config YAML, the fields given on the command line (they
    win), then ``fixed`` (what the command itself sets); local paths made absolute."""
    config = load_config(args.config, {**overrides_from(args), **fixed})
    return dataclasses.replace(config, **resolve_config_paths(config.to_dict()))
