"""``dpolab train``: one DPO run from a YAML config plus ``--field value`` overrides.

The options are generated from :class:`~dpolab.config.TrainConfig` by ``transformers``'
``HfArgumentParser`` (type, choices and help come from each field), so ``dpolab train --help``
lists every field and argparse converts the values. A field given on the command line wins over
the YAML; one not given keeps the YAML's value, else the field's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any

from dpolab.config import TrainConfig
from dpolab.paths import resolve_config_paths, user_path

logger = logging.getLogger(__name__)


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


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train a model with DPO", parents=[config_options()], allow_abbrev=False,
        usage="dpolab train [--config YAML] [--output-dir DIR] [--resume] [--FIELD VALUE ...]",
        description="Train with DPO. Every TrainConfig field below can be set in the --config YAML "
        "or here (the command line wins), e.g. --beta 0.2 --loss-type ipo --dataset data/train.jsonl.gz. "
        "Each help reads (type, default): meaning.")
    add_run_arguments(train, run_train, default_name="train", config_hint="configs/*.yaml")


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


def run_train(args: argparse.Namespace) -> int:
    from dpolab.config import load_config
    from dpolab.dpo.trainer import train

    config = load_config(args.config, overrides_from(args))
    config = dataclasses.replace(config, **resolve_config_paths(config.to_dict()))
    output_dir = args.output_dir or user_path(f"runs/{args.config.stem if args.config else 'train'}")
    run = train(config, output_dir, resume=args.resume)
    print_run_result(run)
    return 0


def print_run_result(run) -> None:
    summary = run.summary()
    eval_metrics = summary["eval"]
    print(f"\nrun folder: {run.path}")
    print(f"model:      {run.model_dir}")
    print(f"eval loss {eval_metrics['loss']:.4f} | reward accuracy {eval_metrics['rewards/accuracies']:.3f} | "
          f"reward margin {eval_metrics['rewards/margins']:.4f} | {summary['pairs_per_s']} pairs/s")
    logger.debug(json.dumps(summary))
