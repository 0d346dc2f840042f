"""``dpolab sft``: supervised fine-tuning on the chosen answers, the stage before ``dpolab train``.

Same options as ``dpolab train`` (every TrainConfig field; ``stage`` is set to ``sft``), same
run folder; then ``dpolab train --model RUN`` runs DPO from the SFT model, which is also its
reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math

from dpolab.paths import resolve_config_paths, user_path
from dpolab.train_options import add_run_arguments, config_options, overrides_from, throughput

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    sft = subparsers.add_parser(
        "sft", help="supervised fine-tuning on the chosen answers (before DPO)", parents=[config_options()],
        allow_abbrev=False, usage="dpolab sft [--config YAML] [--output-dir DIR] [--resume] [--FIELD VALUE ...]",
        description="Fine-tune on the chosen answers of the preference data (loss on answer tokens only). "
        "Then `dpolab train --model RUN_DIR` runs DPO from this model, which is also its reference. "
        "Every TrainConfig field below can be set in the --config YAML or here (the command line wins).")
    add_run_arguments(sft, run_sft, default_name="sft", config_hint="configs/sft-*.yaml")


def run_sft(args: argparse.Namespace) -> int:
    from dpolab.config import load_config
    from dpolab.sft.trainer import train_sft

    config = load_config(args.config, {**overrides_from(args), "stage": "sft"})
    config = dataclasses.replace(config, **resolve_config_paths(config.to_dict()))
    output_dir = args.output_dir or user_path(f"runs/{args.config.stem if args.config else 'sft'}")
    run = train_sft(config, output_dir, resume=args.resume)
    summary = run.summary()
    nll = summary["eval"]["loss"]
    print(f"\nrun folder: {run.path}")
    print(f"model:      {run.model_dir}")
    print(f"held-out answer NLL {nll:.4f} (perplexity {math.exp(min(nll, 50)):.1f}) | {throughput(summary)}")
    print(f"next: dpolab train --model {run.path}   # DPO from this model (also its reference)")
    logger.debug(json.dumps(summary))
    return 0
