"""One entry point for every training stage: ``config.stage`` picks SFT or DPO.

The sweep runner trains through here, so a sweep file whose ``base`` says ``stage: sft`` sweeps
SFT configurations with the same machinery (storage, pruning, best.json) as DPO ones.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from dpolab.config import TrainConfig
from dpolab.dpo.trainer import train as train_dpo
from dpolab.runs import RunFolder
from dpolab.sft.trainer import train_sft


def train(config: TrainConfig, output_dir: str | Path, resume: bool = False,
          callbacks: list[TrainerCallback] | None = None) -> RunFolder:
    """Train ``config`` with its stage's engine and return the finished run folder."""
    stage_train = train_sft if config.stage == "sft" else train_dpo
    return stage_train(config, output_dir, resume, callbacks)
