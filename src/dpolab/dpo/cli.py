"""``dpolab train``: one DPO run from a YAML config plus ``--key value`` overrides."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train a model with DPO",
        description="Train with DPO. Any TrainConfig field can be overridden as --key value "
        "(e.g. --beta 0.2 --loss-type ipo --dataset data/train.jsonl.gz); see configs/*.yaml.")
    train.add_argument("--config", help="YAML config file (configs/*.yaml)")
    train.add_argument("--output-dir", help="run folder (default: runs/<config name or 'train'>)")
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    train.set_defaults(func=run_train, accepts_overrides=True)


def run_train(args: argparse.Namespace) -> int:
    from dpolab.config import load_config, parse_overrides
    from dpolab.dpo.trainer import train

    config = load_config(args.config, parse_overrides(args.overrides))
    output_dir = Path(args.output_dir or Path("runs") / (Path(args.config).stem if args.config else "train"))
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
