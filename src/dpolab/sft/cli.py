"""``dpolab sft``: supervised fine-tuning on the chosen answers, the stage before ``dpolab train``.

Same options as ``dpolab train`` (every TrainConfig field; ``stage`` is set to ``sft``), same
run folder; then ``dpolab train --model RUN`` runs DPO from the SFT model, which is also its
reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

from dpolab.paths import user_path
from dpolab.train_options import add_run_arguments, config_from, config_options, overrides_from, throughput

logger = logging.getLogger(__name__)

# Fields only the DPO objective reads: SFT's loss is the chosen answers' NLL, with no reference model.
DPO_ONLY = ("loss_type", "beta", "label_smoothing", "rpo_alpha", "ref_model")


def register(subparsers: argparse._SubParsersAction) -> None:
    sft = subparsers.add_parser(
        "sft", help="supervised fine-tuning on the chosen answers (before DPO)", parents=[config_options()],
        allow_abbrev=False, usage="dpolab sft [--config YAML] [--output-dir DIR] [--resume] [--FIELD VALUE ...]",
        description="Fine-tune on the chosen answers of the preference data (loss on answer tokens only). "
        "Then `dpolab train --model RUN_DIR` runs DPO from this model, which is also its reference. "
        "Every TrainConfig field below can be set in the --config YAML or here (the command line wins).")
    add_run_arguments(sft, run_sft, default_name="sft", config_hint="configs/sft-*.yaml")


def run_sft(args: argparse.Namespace) -> int:
    from dpolab.sft.trainer import train_sft

    check_sft_options(overrides_from(args))
    config = config_from(args, stage="sft")
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


def check_sft_options(overrides: dict[str, Any]) -> None:
    """Refuse options given on the command line that `dpolab sft` would silently ignore (a config
    YAML may still hold them: one file can serve both stages)."""
    from dpolab.errors import ConfigError

    if overrides.get("stage", "sft") != "sft":
        raise ConfigError(f"--stage {overrides['stage']}: `dpolab sft` trains stage 'sft'; "
                          f"run `dpolab train` for DPO")
    given = [name for name in DPO_ONLY if name in overrides]
    if given:
        option = "--" + given[0].replace("_", "-")
        raise ConfigError(f"{option}: a DPO option that SFT does not use; drop it here and give it to "
                          "`dpolab train --model RUN_DIR`")
