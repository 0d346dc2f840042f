"""The DPO engine: a small ``transformers.Trainer`` subclass plus :func:`train`, which turns a
:class:`TrainConfig` into a finished run folder.

Trainer brings gradient accumulation, warm-up and schedulers, weight decay, bf16/fp16,
checkpoints and ``--resume``, multi-GPU under ``accelerate launch`` / ``torchrun``, and the
tracker integrations (``report_to``). We add only what DPO needs: the loss on precomputed
reference log-probs, answer-only log-probs, and metrics under TRL's names.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import dpolab
from dpolab.config import TrainConfig, save_config
from dpolab.data import default_cache_dir, prepare_data
from dpolab.dpo.logps import PreferenceCollator, answer_lengths, concatenated_forward
from dpolab.dpo.loss import chosen_nll, preference_loss, preference_metrics
from dpolab.dpo.reference import add_reference_logps, load_reference
from dpolab.dpo.samples import sample_callbacks
from dpolab.errors import ConfigError
from dpolab.lora import add_adapters, quantization_config, save_final_model, uses_lora
from dpolab.model import (
    disable_dropout,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    use_fused_gelu,
)
from dpolab.runs import RunFolder
from dpolab.tracking import SystemSampler, tracker_session

logger = logging.getLogger(__name__)

PER_PAIR_KEYS = ("losses", "chosen_rewards", "rejected_rewards", "policy_chosen_logps", "policy_rejected_logps")


class DPOEngine(Trainer):
    """``Trainer`` whose loss is DPO on a batch of (2B, T) sequences with precomputed reference log-probs."""

    def __init__(self, *args: Any, dpo_config: TrainConfig, system_sampler: SystemSampler | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dpo_config = dpo_config
        self.system_sampler = system_sampler
        # Our loss is already a per-pair mean: let Trainer divide it by the accumulation steps,
        # so 2 micro-batches of 2 give exactly the gradient of one batch of 4.
        self.model_accepts_loss_kwargs = False
        self._per_pair: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list),
                                                                     "eval": defaultdict(list)}
        self.pairs_seen = 0
        self.tokens_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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
            self.tokens_seen += int(inputs["attention_mask"].sum())
        # Gather per-pair values from every process so logged means cover the global batch.
        values = (losses.detach(), chosen_rewards, rejected_rewards,
                  policy_chosen_logps.detach(), policy_rejected_logps.detach())
        for key, value in zip((*PER_PAIR_KEYS, "chosen_lengths"), (*values, lengths["chosen_lengths"]), strict=True):
            self._per_pair[mode][key].append(self.accelerator.gather_for_metrics(value).float().cpu())
        loss = losses.mean()
        if self.dpo_config.rpo_alpha:
            loss = loss + self.dpo_config.rpo_alpha * chosen_nll(policy_chosen_logps, lengths["chosen_lengths"])
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # There are no labels: evaluation is the DPO loss and its metrics.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

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
        if self.system_sampler is not None:
            logs.update(self.system_sampler.latest())
        super().log(logs, start_time)


class EvaluateAtEnd(TrainerCallback):
    """Evaluate at the last optimizer step inside the training loop, so trackers (MLflow closes its
    run when training ends) and the sweep's pruner see the final evaluation. With per-epoch
    evaluation the last epoch's end already does it; a run cut mid-epoch by max_steps is
    evaluated by :func:`fit` afterwards."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy == "steps" and state.global_step >= state.max_steps > 0:
            control.should_evaluate = True
        return control


class RunRecorder(TrainerCallback):
    """Appends every train log and evaluation to the run folder's ``metrics.jsonl``."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.start = time.monotonic()
        self.final_train_metrics: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:  # Trainer's end-of-training summary, not a step log
            self.final_train_metrics = dict(logs)
            return
        is_eval = any(k.startswith("eval_") for k in logs)
        row: dict[str, Any] = {"split": "eval" if is_eval else "train", "step": state.global_step,
                               "epoch": round(state.epoch or 0.0, 4), "time_s": round(time.monotonic() - self.start, 3)}
        for key, value in logs.items():
            key = key.removeprefix("eval_")
            if key.startswith("system/") or key in ("runtime", "samples_per_second", "steps_per_second", "epoch"):
                continue
            row[key] = value
        self.run.append_metrics(row)


def training_arguments(config: TrainConfig, run: RunFolder, device: str, dtype: str) -> TrainingArguments:
    """Map our config onto ``TrainingArguments`` (one place, so the TRL engine uses the same)."""
    return TrainingArguments(**training_argument_kwargs(config, run, device, dtype))


def training_argument_kwargs(config: TrainConfig, run: RunFolder, device: str, dtype: str) -> dict[str, Any]:
    """The ``TrainingArguments`` fields of our config; ``DPOConfig`` (a subclass) takes them too."""
    return dict(
        output_dir=str(run.checkpoints_dir),
        run_name=config.run_name or run.path.name,
        project="dpolab",  # Trackio's project (W&B's comes from WANDB_PROJECT, see tracking.py)
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if config.eval_steps else "epoch",
        eval_steps=config.eval_steps,
        save_strategy="steps" if config.save_steps else "epoch",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=config.report_to or "none",
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        length_column_name="length",
        use_cpu=device == "cpu",
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        dataloader_num_workers=0,
        gradient_checkpointing=config.gradient_checkpointing,
        # Non-reentrant: works when the inputs need no grad (frozen embeddings under LoRA).
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def prepare_run(config: TrainConfig, output_dir: str | Path, resume: bool, engine: str) -> RunFolder:
    """Create the run folder (or check it can be resumed) and write run.json + config.yaml."""
    output_dir = Path(output_dir)
    if RunFolder.is_run(output_dir) and not resume:
        if (output_dir / "summary.json").exists():
            raise ConfigError(f"{output_dir}: a finished run is already there; choose another --output-dir")
        if last_complete_checkpoint(output_dir / "checkpoints"):
            raise ConfigError(f"{output_dir}: an unfinished run with checkpoints is there; add --resume to continue it")
    run = RunFolder.create(output_dir, {
        "engine": engine, "base_model": config.model, "dataset": config.dataset,
        "data_dir": config.data_dir, "dpolab_version": dpolab.__version__})
    save_config(config, run.config_path)
    return run


def last_complete_checkpoint(folder: Path) -> str | None:
    """Newest checkpoint that was fully written. Trainer writes ``trainer_state.json`` last, so a
    run killed while saving leaves a newer folder without it (or with a torn one): skip those."""
    if not folder.is_dir():
        return None
    checkpoints = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                         key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in checkpoints:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            logger.warning("ignoring incomplete checkpoint %s (killed while saving?)", checkpoint)
            continue
        return str(checkpoint)
    return None


def drop_metrics_after(run: RunFolder, step: int) -> None:
    """On resume, forget rows logged after the checkpoint: they will be logged again."""
    rows = [r for r in run.metrics() if r["step"] <= step]
    run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_prepared(config: TrainConfig):
    """Tokenizer, model (dropout off), prepared data with reference log-probs, and bookkeeping."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, quantization_config=quantization_config(config, device))
    disable_dropout(model)
    use_fused_gelu(model)
    datasets, report, data_key = prepare_data(config, tokenizer)
    # Under torchrun / accelerate launch each process scores the reference on its own GPU.
    target = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else device
    if not getattr(model, "is_loaded_in_4bit", False):  # a 4-bit model is placed by from_pretrained
        model.to(target)
    # The reference only lives for its one pass (or not at all on a cache hit's key check).
    reference = load_reference(config.ref_model, model, target) if config.ref_model else model
    datasets, reference_info = add_reference_logps(
        reference, datasets, data_key, Path(config.cache_dir or default_cache_dir()), tokenizer.pad_token_id,
        batch_size=config.per_device_eval_batch_size, chunk_size=config.logps_chunk_size)
    del reference
    if uses_lora(config):  # after the reference pass: it scored the base model, adapters are a no-op on it
        model = add_adapters(model, config)
    return tokenizer, model, datasets, report, reference_info, device, dtype


def train(config: TrainConfig, output_dir: str | Path, resume: bool = False,
          callbacks: list[TrainerCallback] | None = None) -> RunFolder:
    """Train with DPO and return the finished run folder (see docs/run-folder.md).

    ``callbacks`` are extra ``TrainerCallback``s (the sweep's pruning callback).
    """
    if config.engine == "trl":
        from dpolab.dpo.trl_engine import train_trl

        return train_trl(config, output_dir, resume, callbacks)
    run = prepare_run(config, output_dir, resume, engine="dpolab")
    tokenizer, model, datasets, report, reference_info, device, dtype = load_prepared(config)
    run.write_data_report(report.to_dict())

    def make_trainer(trainer_callbacks: list[TrainerCallback], sampler: SystemSampler) -> Trainer:
        return DPOEngine(
            model=model, args=training_arguments(config, run, device, dtype),
            train_dataset=datasets["train"], eval_dataset=datasets["eval"],
            data_collator=PreferenceCollator(tokenizer.pad_token_id), processing_class=tokenizer,
            callbacks=[*trainer_callbacks, *sample_callbacks(config, run, tokenizer, datasets["eval"],
                                                             reference_info["reference_key"], config.beta)],
            dpo_config=config, system_sampler=sampler)

    return fit(run, config, resume, make_trainer, tokenizer, datasets, reference_info, callbacks)


def fit(run: RunFolder, config: TrainConfig, resume: bool,
        make_trainer: Callable[[list[TrainerCallback], SystemSampler], Trainer],
        tokenizer, datasets, reference_info: dict[str, Any],
        callbacks: list[TrainerCallback] | None = None) -> RunFolder:
    """What both engines share around ``Trainer.train``: resume, records, trackers, the final
    evaluation, the saved model and ``summary.json``."""
    last_checkpoint = last_complete_checkpoint(run.checkpoints_dir) if resume else None
    if last_checkpoint:
        step = int(Path(last_checkpoint).name.split("-")[-1])
        logger.info("resuming from %s (step %d)", last_checkpoint, step)
        drop_metrics_after(run, step)
    elif run.metrics_path.exists():
        run.metrics_path.unlink()

    recorder = RunRecorder(run)
    with tracker_session(config.report_to, run.path), SystemSampler(run) as sampler:
        trainer = make_trainer([recorder, EvaluateAtEnd(), *(callbacks or [])], sampler)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=last_checkpoint)
        wall_time = time.perf_counter() - start
        eval_rows = run.metrics("eval")
        if not eval_rows or eval_rows[-1]["step"] != trainer.state.global_step:
            trainer.evaluate()
            eval_rows = run.metrics("eval")

    if trainer.is_world_process_zero():
        save_final_model(trainer, run, config.model)
        tokenizer.save_pretrained(str(run.model_dir))
        write_summary(run, trainer, recorder, eval_rows[-1], reference_info, wall_time, datasets)
    trainer.accelerator.wait_for_everyone()
    logger.info("run finished: %s", run.path)
    return run


def write_summary(run: RunFolder, engine: Trainer, recorder: RunRecorder, final_eval: dict[str, Any],
                  reference_info: dict[str, Any], wall_time: float, datasets) -> None:
    pairs = getattr(engine, "pairs_seen", 0) * engine.args.world_size
    tokens = getattr(engine, "tokens_seen", 0) * engine.args.world_size
    train_metrics = recorder.final_train_metrics
    eval_metrics = {k: v for k, v in final_eval.items() if k not in ("split", "time_s")}
    run.write_summary({
        "train": {"loss": train_metrics.get("train_loss"), "steps": engine.state.global_step,
                  "epochs": round(engine.state.epoch or 0.0, 4)},
        "eval": eval_metrics,
        "wall_time_s": round(wall_time, 3),
        **reference_info,
        "train_pairs": len(datasets["train"]),
        "eval_pairs": len(datasets["eval"]),
        "pairs_per_s": round(pairs / wall_time, 3) if pairs else None,
        "tokens_per_s": round(tokens / wall_time, 1) if tokens else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    })


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / 1024 if os.name == "posix" else psutil.Process().memory_info().rss / 2**20
