"""``dpolab train``: one DPO run from a YAML config plus ``--field value`` overrides
(the options: :mod:`dpolab.train_options`)."""

from __future__ import annotations

import argparse
import json
import logging

from dpolab.paths import user_path
from dpolab.train_options import add_run_arguments, config_from, config_options, throughput

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train a model with DPO", parents=[config_options()], allow_abbrev=False,
        usage="dpolab train [--config YAML] [--output-dir DIR] [--resume] [--FIELD VALUE ...]",
        description="Train with DPO. Every TrainConfig field below can be set in the --config YAML "
        "or here (the command line wins), e.g. --beta 0.2 --loss-type ipo --dataset data/train.jsonl.gz. "
        "Each help reads (type, default): meaning.")
    add_run_arguments(train, run_train, default_name="train", config_hint="configs/*.yaml")


def run_train(args: argparse.Namespace) -> int:
    from dpolab.dpo.trainer import train

    config = config_from(args)
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
          f"reward margin {eval_metrics['rewards/margins']:.4f} | {throughput(summary)}")
    print(f"next: dpolab evaluate {run.path}   # held-out metrics and sampled answers; "
          f"or dpolab serve {run.path} to chat with it")
    logger.debug(json.dumps(summary))
