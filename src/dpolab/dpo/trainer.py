"""The DPO engine: a small ``transformers.Trainer`` subclass plus :func:`train`, which turns a
:class:`TrainConfig` into a finished run folder (the lifecycle around ``Trainer.train`` is
:mod:`dpolab.lifecycle`, shared with the TRL engine).

Trainer brings gradient accumulation, warm-up and schedulers, weight decay, bf16/fp16,
checkpoints and ``--resume``, multi-GPU under ``accelerate launch`` / ``torchrun``, and the
tracker integrations (``report_to``). We add only what DPO needs: the loss on precomputed
reference log-probs, answer-only log-probs, and metrics under TRL's names.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from dpolab.config import TrainConfig
from dpolab.data import LENGTH_COLUMNS, default_cache_dir
from dpolab.dpo.reference import add_reference_logps, load_reference
from dpolab.dpo.trl_engine import train_trl
from dpolab.errors import ConfigError
from dpolab.lifecycle import (
    StageTrainer,
    fit,
    prepare_run,
    record_setup,
    stage_optimizer,
    stage_training_arguments,
)
from dpolab.lora import add_adapters, uses_lora
from dpolab.precision import MasterWeightAdamW
from dpolab.runs import RunFolder
from dpolab.samples import sample_callbacks
from dpolab.scoring.collate import COMPILE_LENGTH_BUCKET, PreferenceCollator, batch_tokens, choose_packed
from dpolab.scoring.length import length_metrics, pair_records
from dpolab.scoring.logps import answer_lengths, concatenated_stats
from dpolab.scoring.loss import chosen_nll, pair_losses, preference_metrics
from dpolab.stage_setup import StageSetup, setup_stage
from dpolab.tracking import SystemSampler

logger = logging.getLogger(__name__)

PER_PAIR_KEYS = ("losses", "chosen_rewards", "rejected_rewards", "policy_chosen_logps", "policy_rejected_logps")


class DpolabTrainer(StageTrainer):
    """``Trainer`` whose loss is DPO on a batch of (2B, T) sequences with precomputed reference log-probs."""

    def __init__(self, *args: Any, dpo_config: TrainConfig, run: RunFolder | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dpo_config = dpo_config
        self.run = run  # where each evaluation's per-pair margins and lengths go (eval_pairs.jsonl)
        self._per_pair: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list),
                                                                     "eval": defaultdict(list)}
        # The micro-batch's share of its batch's pairs: its loss counts that much of the batch's (see
        # training_step). 1 for a batch that is not split.
        self._share = 1.0

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A token-budget batch (``{"micro_batches": [...]}``, ``max_tokens_per_batch``) is one
        forward + backward per micro-batch, each loss weighted by its share of the batch, so the
        summed gradients and loss are the whole batch's; gradients sync once, after the last."""
        if "micro_batches" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        loss = 0.0
        for last, micro, share in _shares(inputs["micro_batches"]):
            self._share = share
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = loss + super().training_step(model, micro, num_items_in_batch)
        self._share = 1.0
        return loss

    def _clip_grad_norm(self, model):
        # bf16 weights: clip the fp32 master gradients in one foreach pass (MasterWeightAdamW)
        # instead of clip_grad_norm_'s norm and multiply per tensor (no foreach on CPU).
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper
        if isinstance(optimizer, MasterWeightAdamW):
            return optimizer.clip_master_grads(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if "micro_batches" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        loss = 0.0
        for _, micro, share in _shares(inputs["micro_batches"]):
            self._share = share
            loss = loss + super().prediction_step(model, micro, prediction_loss_only, ignore_keys)[0]
        self._share = 1.0
        return loss, None, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.dpo_config
        # accelerate autocasts only the model's own forward and hands back fp32 outputs: without
        # this context the answer-only head (applied after the forward) would run in fp32.
        with self.accelerator.autocast():
            policy = concatenated_stats(model, inputs, config.logps_chunk_size, tails=config.ld_alpha is not None,
                                        aligned=config.use_weighting)  # (B,) each
        lengths = answer_lengths(inputs)
        # The cached reference pass's columns (none for a reference-free loss), named as the policy's.
        reference = None if config.reference_free else {
            key.removeprefix("ref_"): value for key, value in inputs.items() if key.startswith("ref_")}
        out = pair_losses(policy, reference, **lengths, **config.loss_options())
        mode = "train" if model.training else "eval"
        if mode == "train":
            self.pairs_seen += lengths["chosen_lengths"].shape[0]
            self.tokens_seen += batch_tokens(inputs)
        # Gather per-pair values from every process so logged means cover the global batch.
        values = {**out, "losses": out["losses"].detach(), "chosen_lengths": lengths["chosen_lengths"],
                  "sft_chosen_logps": policy["chosen_logps"].detach()}  # the NLL reads the plain sums
        for key in (*PER_PAIR_KEYS, "chosen_lengths", "sft_chosen_logps"):
            self._per_pair[mode][key].append(self.accelerator.gather_for_metrics(values[key]).float().cpu())
        if mode == "eval":  # the answers' lengths, for the length-controlled metrics
            for key in LENGTH_COLUMNS:
                self._per_pair[mode][key].append(self.accelerator.gather_for_metrics(inputs[key]).cpu())
        loss = out["losses"].mean() * self._share  # the micro-batch's share of its batch's pairs
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        per_pair = {k: torch.cat(v) for k, v in self._per_pair[mode].items() if v}
        if per_pair:
            metrics = preference_metrics(*(per_pair[k] for k in PER_PAIR_KEYS))
            if any(name == "sft" for name, _ in self.dpo_config.loss_terms):
                # Over every chosen token logged since the last log (TRL's token mean, window-wide);
                # ``loss`` already holds each batch's own sft term, as TRL's does.
                metrics["nll_loss"] = chosen_nll(per_pair["sft_chosen_logps"], per_pair["chosen_lengths"]).item()
            if mode == "train":
                metrics.pop("loss")  # Trainer's own running mean of the optimised loss is the same number
            else:
                metrics.update(self._length_metrics(per_pair))
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": v for k, v in metrics.items()})
        self._per_pair[mode].clear()
        super().log(logs, start_time)  # adds the system readings

    def _length_metrics(self, per_pair: dict[str, torch.Tensor]) -> dict[str, float | int]:
        """Length-controlled metrics of one evaluation (the function ``dpolab evaluate`` uses); its
        per-pair margins and lengths replace ``eval_pairs.jsonl``, so the last one is the final evaluation's."""
        margins = per_pair["chosen_rewards"] - per_pair["rejected_rewards"]  # (N,)
        lengths = {key: per_pair[key] for key in LENGTH_COLUMNS}
        if self.run is not None and self.is_world_process_zero():
            self.run.write_eval_pairs(pair_records(margins, lengths))
        return length_metrics(margins, **lengths)


def _shares(micro_batches: list[dict[str, torch.Tensor]]) -> Iterator[tuple[bool, dict[str, torch.Tensor], float]]:
    """(is last, micro-batch, its share of the batch's pairs)."""
    counts = [len(answer_lengths(micro)["chosen_lengths"]) for micro in micro_batches]
    for i, (micro, count) in enumerate(zip(micro_batches, counts, strict=True)):
        yield i == len(micro_batches) - 1, micro, count / sum(counts)


def token_budget_arguments(args: TrainingArguments, config: TrainConfig) -> TrainingArguments:
    """With ``max_tokens_per_batch``, Trainer hands over each optimizer batch whole (batch size x
    accumulation steps pairs, no accumulation of its own): the collator splits it by tokens and
    :meth:`DpolabTrainer.training_step` accumulates over the pieces."""
    if config.max_tokens_per_batch:
        args.per_device_train_batch_size = config.per_device_train_batch_size * config.gradient_accumulation_steps
        args.gradient_accumulation_steps = 1
    return args


@dataclass
class Prepared:
    """What a DPO run starts from: the shared stage setup (policy, tokenizer, data, resolved
    settings) with the cached reference log-probs added to the data."""

    setup: StageSetup
    reference_info: dict[str, Any]  # reference_cache / reference_time_s / reference_key, for summary.json


def load_prepared(config: TrainConfig, recorded: dict[str, Any] | None = None) -> Prepared:
    """The stage setup plus reference log-probs (scored once, cached); adapters added last.

    ``recorded``: the resolved settings of a run being resumed (see :func:`setup_stage`)."""
    setup = setup_stage(config, recorded)
    model, settings = setup.model, setup.settings
    if config.reference_free:  # SimPO / SFT terms only: no reference model, no reference pass
        logger.info("loss %s reads no reference: reference pass skipped", config.loss_type)
        reference_info = {"reference_cache": "none", "reference_time_s": 0.0, "reference_key": None,
                          "reference_free": True}
        settings.reference = {"model": None, "role": "none (reference-free loss)", "key": None}
    else:
        target = next(model.parameters()).device
        # A separate reference (ref_model) lives only for its one pass.
        reference = load_reference(config.ref_model, model, target) if config.ref_model else model
        reference_packed = setup.packed if reference is model else choose_packed(
            "packed" if setup.packed else "padded", settings.device, reference)
        setup.datasets, reference_info = add_reference_logps(
            reference, setup.datasets, settings.data_key, Path(config.cache_dir or default_cache_dir()),
            PreferenceCollator(setup.tokenizer.pad_token_id, packed=reference_packed),
            batch_size=config.per_device_eval_batch_size, chunk_size=config.logps_chunk_size,
            tails=config.ld_alpha is not None)
        del reference
        settings.reference = {"model": config.ref_model or config.model,
                              "role": "ref_model" if config.ref_model else "starting model",
                              "key": reference_info["reference_key"]}
    if uses_lora(config):  # after the reference pass: it scored the base model, adapters are a no-op on it
        setup.model = add_adapters(model, config)
    return Prepared(setup, reference_info)


def train(config: TrainConfig, output_dir: str | Path, resume: bool = False,
          callbacks: list[TrainerCallback] | None = None) -> RunFolder:
    """Train with DPO on the engine ``config.engine`` names and return the finished run folder
    (see docs/run-folder.md). ``callbacks`` are extra ``TrainerCallback``s (the sweep's pruning callback).
    """
    if config.stage != "dpo":
        raise ConfigError(f"stage {config.stage!r} is not DPO: run it with `dpolab {config.stage}` or a sweep")
    if config.engine == "trl":
        return train_trl(config, output_dir, resume, callbacks)
    start = prepare_run(config, output_dir, resume, engine="dpolab")
    if start.finished:
        return start.run
    run = start.run
    with start.removed_on_failure():
        prepared = load_prepared(config, start.recorded)
        setup = prepared.setup
        record_setup(run, setup)

    def make_trainer(trainer_callbacks: list[TrainerCallback], sampler: SystemSampler) -> Trainer:
        args = token_budget_arguments(stage_training_arguments(config, run, setup), config)
        return DpolabTrainer(
            model=setup.model, args=args, optimizer_cls_and_kwargs=stage_optimizer(DpolabTrainer, args, setup),
            train_dataset=setup.datasets["train"], eval_dataset=setup.datasets["eval"],
            data_collator=PreferenceCollator(setup.tokenizer.pad_token_id, packed=setup.packed,
                                             pair_keys=LENGTH_COLUMNS, max_tokens=config.max_tokens_per_batch,
                                             pad_to_multiple_of=COMPILE_LENGTH_BUCKET if config.compile else 1),
            processing_class=setup.tokenizer,
            callbacks=[*trainer_callbacks, *sample_callbacks(config, run, setup, prepared.reference_info["reference_key"],
                                                             config.beta)],
            dpo_config=config, run=run, system_sampler=sampler)

    return fit(run, config, make_trainer, tokenizer=setup.tokenizer, datasets=setup.datasets,
               resume=resume, callbacks=callbacks,
               summary_extra={**prepared.reference_info, "batch_layout": setup.settings.batch_layout,
                              "dtype": setup.settings.dtype})
