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
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from dpolab.config import TrainConfig
from dpolab.data import DataReport, bind_template, default_cache_dir, prepare_data
from dpolab.dpo.reference import add_reference_logps, load_reference
from dpolab.dpo.trl_engine import train_trl
from dpolab.errors import ConfigError
from dpolab.lifecycle import StageTrainer, fit, prepare_run, resolve_hardware, training_arguments
from dpolab.lora import add_adapters, quantization_config, uses_lora
from dpolab.model import disable_dropout, load_model, load_tokenizer, use_fused_gelu
from dpolab.precision import MasterWeightAdamW, master_weight_optimizer, uses_bf16_weights
from dpolab.runs import RunFolder
from dpolab.samples import sample_callbacks
from dpolab.scoring.collate import COMPILE_LENGTH_BUCKET, PreferenceCollator, batch_tokens, choose_packed
from dpolab.scoring.logps import answer_lengths, concatenated_forward
from dpolab.scoring.loss import chosen_nll, preference_loss, preference_metrics
from dpolab.tracking import SystemSampler

logger = logging.getLogger(__name__)

PER_PAIR_KEYS = ("losses", "chosen_rewards", "rejected_rewards", "policy_chosen_logps", "policy_rejected_logps")


class DpolabTrainer(StageTrainer):
    """``Trainer`` whose loss is DPO on a batch of (2B, T) sequences with precomputed reference log-probs."""

    def __init__(self, *args: Any, dpo_config: TrainConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dpo_config = dpo_config
        self._per_pair: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list),
                                                                     "eval": defaultdict(list)}
        # The micro-batch's share of its batch's (pairs, chosen answer tokens): its loss counts that
        # much of the batch's (see training_step). (1, 1) for a batch that is not split.
        self._share = (1.0, 1.0)

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
        self._share = (1.0, 1.0)
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
        self._share = (1.0, 1.0)
        return loss, None, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # accelerate autocasts only the model's own forward and hands back fp32 outputs: without
        # this context the answer-only head (applied after the forward) would run in fp32.
        with self.accelerator.autocast():
            policy_chosen_logps, policy_rejected_logps = concatenated_forward(
                model, inputs, self.dpo_config.logps_chunk_size)  # (B,), (B,)
        lengths = answer_lengths(inputs)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen_logps, policy_rejected_logps,
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
            beta=self.dpo_config.beta, loss_type=self.dpo_config.loss_type,
            label_smoothing=self.dpo_config.label_smoothing, **lengths)
        mode = "train" if model.training else "eval"
        if mode == "train":
            self.pairs_seen += policy_chosen_logps.shape[0]
            self.tokens_seen += batch_tokens(inputs)
        # Gather per-pair values from every process so logged means cover the global batch.
        values = (losses.detach(), chosen_rewards, rejected_rewards,
                  policy_chosen_logps.detach(), policy_rejected_logps.detach())
        for key, value in zip((*PER_PAIR_KEYS, "chosen_lengths"), (*values, lengths["chosen_lengths"]), strict=True):
            self._per_pair[mode][key].append(self.accelerator.gather_for_metrics(value).float().cpu())
        pair_share, token_share = self._share
        loss = losses.mean() * pair_share
        if self.dpo_config.rpo_alpha:  # a mean over chosen tokens: weighted by the micro-batch's share of them
            loss = loss + self.dpo_config.rpo_alpha * chosen_nll(
                policy_chosen_logps, lengths["chosen_lengths"]) * token_share
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        per_pair = {k: torch.cat(v) for k, v in self._per_pair[mode].items() if v}
        if per_pair:
            metrics = preference_metrics(*(per_pair[k] for k in PER_PAIR_KEYS))
            if self.dpo_config.rpo_alpha:
                # Over every chosen token logged since the last log (TRL's token mean, window-wide).
                metrics["nll_loss"] = chosen_nll(per_pair["policy_chosen_logps"], per_pair["chosen_lengths"]).item()
                metrics["loss"] += self.dpo_config.rpo_alpha * metrics["nll_loss"]
            if mode == "train":
                metrics.pop("loss")  # Trainer's own running mean of the optimised loss is the same number
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": v for k, v in metrics.items()})
        self._per_pair[mode].clear()
        super().log(logs, start_time)  # adds the system readings


def _shares(micro_batches: list[dict[str, torch.Tensor]]) -> Iterator[tuple[bool, dict[str, torch.Tensor],
                                                                           tuple[float, float]]]:
    """(is last, micro-batch, its share of the batch's pairs and of its chosen answer tokens)."""
    def chosen_tokens(micro: dict[str, torch.Tensor]) -> float:
        return float(answer_lengths(micro)["chosen_lengths"].sum())

    pairs = sum(len(m["ref_chosen_logps"]) for m in micro_batches)
    tokens = sum(chosen_tokens(m) for m in micro_batches)
    for i, micro in enumerate(micro_batches):
        yield i == len(micro_batches) - 1, micro, (len(micro["ref_chosen_logps"]) / pairs, chosen_tokens(micro) / tokens)


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
    """What a DPO run starts from: the policy (dropout off, on its device), its tokenizer, the
    tokenized pairs with their cached reference log-probs, and how they were obtained."""

    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    datasets: DatasetDict
    data_report: DataReport
    reference_info: dict[str, Any]  # reference_cache / reference_time_s / reference_key, for summary.json
    device: str
    dtype: str
    packed: bool  # batch layout without padding (dpolab.scoring.collate)


def load_prepared(config: TrainConfig) -> Prepared:
    """Tokenizer, model (dropout off), prepared data with reference log-probs, and bookkeeping."""
    device, dtype = resolve_hardware(config)
    tokenizer = load_tokenizer(config.model)
    bind_template(tokenizer, config.chat_template)  # saved with the model: serve renders chats the same way
    model = load_model(config.model, quantization_config=quantization_config(config, device))
    disable_dropout(model)
    use_fused_gelu(model)
    if uses_bf16_weights(device, dtype):
        model.to(torch.bfloat16)  # the reference pass scores with the same bf16 weights the policy starts from
    datasets, report, data_key = prepare_data(config, tokenizer)
    # Under torchrun / accelerate launch each process scores the reference on its own GPU.
    target = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else device
    if not getattr(model, "is_loaded_in_4bit", False):  # a 4-bit model is placed by from_pretrained
        model.to(target)
    # A separate reference (ref_model) lives only for its one pass.
    reference = load_reference(config.ref_model, model, target) if config.ref_model else model
    packed = choose_packed(config.batch_layout, device, model)
    reference_packed = packed if reference is model else choose_packed(config.batch_layout, device, reference)
    datasets, reference_info = add_reference_logps(
        reference, datasets, data_key, Path(config.cache_dir or default_cache_dir()),
        PreferenceCollator(tokenizer.pad_token_id, packed=reference_packed),
        batch_size=config.per_device_eval_batch_size, chunk_size=config.logps_chunk_size)
    del reference
    if uses_lora(config):  # after the reference pass: it scored the base model, adapters are a no-op on it
        model = add_adapters(model, config)
    return Prepared(tokenizer, model, datasets, report, reference_info, device, dtype, packed)


def train(config: TrainConfig, output_dir: str | Path, resume: bool = False,
          callbacks: list[TrainerCallback] | None = None) -> RunFolder:
    """Train with DPO on the engine ``config.engine`` names and return the finished run folder
    (see docs/run-folder.md). ``callbacks`` are extra ``TrainerCallback``s (the sweep's pruning callback).
    """
    if config.stage != "dpo":
        raise ConfigError(f"stage {config.stage!r} is not DPO: run it with `dpolab {config.stage}` or a sweep")
    if config.engine == "trl":
        return train_trl(config, output_dir, resume, callbacks)
    run = prepare_run(config, output_dir, resume, engine="dpolab")
    prepared = load_prepared(config)
    run.write_data_report(prepared.data_report.to_dict())

    def make_trainer(trainer_callbacks: list[TrainerCallback], sampler: SystemSampler) -> Trainer:
        # bf16 weights need no autocast on top (it would only convert the outputs back to fp32).
        bf16_weights = uses_bf16_weights(prepared.device, prepared.dtype)
        args = token_budget_arguments(
            training_arguments(config, run, prepared.device, "fp32" if bf16_weights else prepared.dtype), config)
        return DpolabTrainer(
            model=prepared.model, args=args, optimizer_cls_and_kwargs=(
                master_weight_optimizer(DpolabTrainer, args, prepared.model) if bf16_weights else None),
            train_dataset=prepared.datasets["train"], eval_dataset=prepared.datasets["eval"],
            data_collator=PreferenceCollator(prepared.tokenizer.pad_token_id, packed=prepared.packed,
                                             max_tokens=config.max_tokens_per_batch,
                                             pad_to_multiple_of=COMPILE_LENGTH_BUCKET if config.compile else 1),
            processing_class=prepared.tokenizer,
            callbacks=[*trainer_callbacks, *sample_callbacks(config, run, prepared.tokenizer, prepared.datasets["eval"],
                                                             prepared.reference_info["reference_key"], config.beta)],
            dpo_config=config, system_sampler=sampler)

    return fit(run, config, make_trainer, tokenizer=prepared.tokenizer, datasets=prepared.datasets,
               resume=resume, callbacks=callbacks,
               summary_extra={**prepared.reference_info, "batch_layout": "packed" if prepared.packed else "padded"})
