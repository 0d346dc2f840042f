"""The DPO engine: a small ``transformers.Trainer`` subclass plus :func:`train`, which turns a
:class:`TrainConfig` into a finished run folder (the lifecycle around ``Trainer.train`` is
:mod:`dpolab.lifecycle`, shared with the TRL engine).

Trainer brings gradient accumulation, warm-up and schedulers, weight decay, bf16/fp16,
checkpoints and ``--resume``, multi-GPU under ``accelerate launch`` / ``torchrun``, and the
tracker integrations (``report_to``). We add only what DPO needs: the loss on precomputed
reference log-probs, answer-only log-probs, and metrics under TRL's names.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from dpolab.config import TrainConfig
from dpolab.data import DataReport, bind_template, default_cache_dir, prepare_data
from dpolab.dpo.reference import add_reference_logps, load_reference
from dpolab.dpo.trl_engine import train_trl
from dpolab.errors import ConfigError
from dpolab.lifecycle import StageTrainer, fit, prepare_run, resolve_hardware, training_arguments
from dpolab.lora import add_adapters, quantization_config, uses_lora
from dpolab.model import disable_dropout, load_model, load_tokenizer, use_fused_gelu
from dpolab.precision import master_weight_optimizer, uses_bf16_weights
from dpolab.runs import RunFolder
from dpolab.samples import sample_callbacks
from dpolab.scoring.collate import PreferenceCollator, batch_tokens, choose_packed
from dpolab.scoring.logps import answer_lengths, concatenated_stats
from dpolab.scoring.loss import chosen_nll, pair_losses, preference_metrics
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
        loss = out["losses"].mean()
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
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": v for k, v in metrics.items()})
        self._per_pair[mode].clear()
        super().log(logs, start_time)  # adds the system readings


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
    packed = choose_packed(config.batch_layout, device, model)
    if config.reference_free:  # SimPO / SFT terms only: no reference model, no reference pass
        logger.info("loss %s reads no reference: reference pass skipped", config.loss_type)
        reference_info = {"reference_cache": "none", "reference_time_s": 0.0, "reference_key": None,
                          "reference_free": True}
    else:
        # A separate reference (ref_model) lives only for its one pass.
        reference = load_reference(config.ref_model, model, target) if config.ref_model else model
        reference_packed = packed if reference is model else choose_packed(config.batch_layout, device, reference)
        datasets, reference_info = add_reference_logps(
            reference, datasets, data_key, Path(config.cache_dir or default_cache_dir()),
            PreferenceCollator(tokenizer.pad_token_id, packed=reference_packed),
            batch_size=config.per_device_eval_batch_size, chunk_size=config.logps_chunk_size,
            tails=config.ld_alpha is not None)
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
        args = training_arguments(config, run, prepared.device, "fp32" if bf16_weights else prepared.dtype)
        return DpolabTrainer(
            model=prepared.model, args=args, optimizer_cls_and_kwargs=(
                master_weight_optimizer(DpolabTrainer, args, prepared.model) if bf16_weights else None),
            train_dataset=prepared.datasets["train"], eval_dataset=prepared.datasets["eval"],
            data_collator=PreferenceCollator(prepared.tokenizer.pad_token_id, packed=prepared.packed),
            processing_class=prepared.tokenizer,
            callbacks=[*trainer_callbacks, *sample_callbacks(config, run, prepared.tokenizer, prepared.datasets["eval"],
                                                             prepared.reference_info["reference_key"], config.beta)],
            dpo_config=config, system_sampler=sampler)

    return fit(run, config, make_trainer, tokenizer=prepared.tokenizer, datasets=prepared.datasets,
               resume=resume, callbacks=callbacks,
               summary_extra={**prepared.reference_info, "batch_layout": "packed" if prepared.packed else "padded"})
