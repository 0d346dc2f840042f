"""Supervised fine-tuning (SFT): the first stage of the standard recipe, before DPO.

The DPO paper's recipe first fine-tunes the base model on the preferred answers, then runs DPO with
that SFT model as policy start and reference (``dpolab train --model runs/sft``). SFT reads the
same prepared pairs as DPO (same data cache) and trains on ``prompt + chosen``; the loss is the
mean negative log-likelihood of the answer tokens only, through DPO's answer-only chunked LM head:
prompt tokens are context, never targets, and no (B, T, V) logits tensor is ever built.

Its setup (template binding, precision, data) is :mod:`dpolab.stage_setup` and everything around
``Trainer.train`` (run folder, resume, trackers, summary, LoRA save) is :mod:`dpolab.lifecycle`,
both shared with DPO.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from dpolab.config import TrainConfig
from dpolab.lifecycle import (
    StageTrainer,
    fit,
    prepare_run,
    record_setup,
    stage_optimizer,
    stage_training_arguments,
)
from dpolab.lora import add_adapters, uses_lora
from dpolab.runs import RunFolder
from dpolab.samples import sample_callbacks
from dpolab.scoring.collate import PreferenceCollator, batch_tokens
from dpolab.scoring.loss import chosen_nll
from dpolab.stage_setup import setup_stage
from dpolab.tracking import SystemSampler

logger = logging.getLogger(__name__)

SFT_ANSWER = ("chosen_ids",)  # SFT imitates the preferred answer of each pair


class SFTTrainer(StageTrainer):
    """``Trainer`` whose loss is the mean NLL of the answer tokens of a batch of B sequences (padded or packed)."""

    def __init__(self, *args: Any, sft_config: TrainConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sft_config = sft_config

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        answer_logps = self.answer_logps(model, inputs, self.sft_config.logps_chunk_size)  # (B,)
        loss = chosen_nll(answer_logps, inputs["answer_lengths"])  # mean over every answer token
        if model.training:
            self.pairs_seen += answer_logps.shape[0]
            self.tokens_seen += batch_tokens(inputs)
        return (loss, None) if return_outputs else loss


def train_sft(config: TrainConfig, output_dir: str | Path, resume: bool = False,
              callbacks: list[TrainerCallback] | None = None) -> RunFolder:
    """Fine-tune ``config.model`` on the chosen answers of ``config.dataset``; return the finished run
    folder (``run.json`` has ``"stage": "sft"``; its ``model/`` is the next stage's ``--model``)."""
    start = prepare_run(config, output_dir, resume, engine="dpolab")
    if start.finished:
        return start.run
    run = start.run
    with start.removed_on_failure():
        setup = setup_stage(config, start.recorded)
        if uses_lora(config):
            setup.model = add_adapters(setup.model, config)
        record_setup(run, setup)

    def make_trainer(trainer_callbacks: list[TrainerCallback], sampler: SystemSampler) -> Trainer:
        args = stage_training_arguments(config, run, setup)
        return SFTTrainer(
            model=setup.model, args=args, optimizer_cls_and_kwargs=stage_optimizer(SFTTrainer, args, setup),
            train_dataset=setup.datasets["train"], eval_dataset=setup.datasets["eval"],
            data_collator=PreferenceCollator(setup.tokenizer.pad_token_id, answer_keys=SFT_ANSWER, packed=setup.packed),
            processing_class=setup.tokenizer,
            callbacks=[*trainer_callbacks, *sample_callbacks(config, run, setup, None, None)],
            sft_config=config, system_sampler=sampler)

    return fit(run, config, make_trainer, tokenizer=setup.tokenizer, datasets=setup.datasets, resume=resume,
               callbacks=callbacks, summary_extra={"batch_layout": setup.settings.batch_layout,
                                                   "dtype": setup.settings.dtype})
