"""``--engine trl``: the same config and the same prepared pairs, trained by TRL's ``DPOTrainer``.

This is the cross-check engine: if dpolab's answer-only log-probs or cached reference were wrong,
a TRL run on the same data would disagree. Everything around the trainer (run folder, data report,
metrics.jsonl, summary.json, system samples, resume) is shared with the dpolab engine.

Two TRL 1.16 behaviours matter here (checked in ``trl/trainer/dpo_trainer.py``):

* ``DPOTrainer._prepare_dataset`` always re-tokenizes from the text columns (it appends EOS to
  the text and tokenizes ``prompt + answer`` jointly), even when ``prompt_ids`` already exist.
  To train on exactly our truncated ids we skip it (:class:`PretokenizedDPOTrainer`).
* The reference log-probs are computed by TRL itself, at every step (``precompute_ref_log_probs``
  off, TRL's default): an independent check of dpolab's cached reference pass. With a built-in
  model there is no Hub id for TRL to load a reference from, so we pass a second copy.

Known semantic differences (TRL's choice, kept so this engine *is* TRL):
``loss_type='ipo'`` divides each log-ratio by its answer length before the square (dpolab uses
the summed log-ratio, IPO paper Eq. 17); ``label_smoothing`` has no meaning for TRL's ``sigmoid``
loss, so cDPO is refused rather than silently ignored.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from dpolab.config import TrainConfig
from dpolab.errors import ConfigError
from dpolab.runs import RunFolder

logger = logging.getLogger(__name__)

TRL_MISSING = "engine 'trl' needs TRL: pip install 'dpolab[trl]'"


def import_trl() -> Any:
    """The ``trl`` module, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import trl
    except ImportError:
        raise ConfigError(TRL_MISSING) from None
    return trl


def pretokenized_trainer_class() -> type:
    """``DPOTrainer`` that trains on our token ids as they are and counts pairs/tokens like DPOEngine.

    Built in a function so importing this module never needs TRL.
    """
    trl = import_trl()

    class PretokenizedDPOTrainer(trl.DPOTrainer):
        def __init__(self, *args: Any, system_sampler: Any = None, **kwargs: Any) -> None:
            self.system_sampler = system_sampler
            self.pairs_seen = 0
            self.tokens_seen = 0
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Our columns are already tokenized, truncated to max_length and end in EOS.
            missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
            if missing:
                raise ConfigError(f"engine 'trl': {dataset_name} data lacks columns {sorted(missing)}")
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:  # same definitions as DPOEngine: pairs and real (attended) tokens
                self.pairs_seen += inputs["input_ids"].shape[0] // 2
                self.tokens_seen += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self.system_sampler is not None:
                logs.update(self.system_sampler.latest())
            super().log(logs, start_time)

    return PretokenizedDPOTrainer


def dpo_config(config: TrainConfig, run: RunFolder, device: str, dtype: str, **overrides: Any) -> Any:
    """``trl.DPOConfig`` from our config: the shared Trainer fields plus the DPO ones.

    ``gradient_checkpointing`` is off and ``bf16`` follows our ``dtype`` (TRL's defaults are on / on):
    the same config must mean the same compute in both engines.
    """
    from dpolab.dpo.trainer import training_argument_kwargs

    trl = import_trl()
    if config.label_smoothing:
        raise ConfigError("engine 'trl': label_smoothing (cDPO) is not part of TRL 1.16's 'sigmoid' loss; "
                          "use engine 'dpolab' or set label_smoothing 0")
    kwargs = training_argument_kwargs(config, run, device, dtype)
    kwargs.update(
        beta=config.beta,
        loss_type=[config.loss_type],
        max_length=config.max_length,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        disable_dropout=True,
    )
    kwargs.update(overrides)
    return trl.DPOConfig(**kwargs)


def train_trl(config: TrainConfig, output_dir: str | Path, resume: bool = False,
              callbacks: list[Any] | None = None) -> RunFolder:
    """Train ``config`` with TRL's DPOTrainer and write the same run folder as the dpolab engine.

    ``callbacks``: extra ``TrainerCallback``s, as :func:`dpolab.dpo.trainer.train` takes them.
    """
    import_trl()  # fail before any work when TRL is missing
    import torch

    from dpolab.data import prepare_data
    from dpolab.dpo.trainer import (
        RunRecorder,
        drop_metrics_after,
        get_last_checkpoint_or_none,
        prepare_run,
        write_summary,
    )
    from dpolab.model import disable_dropout, load_model, load_tokenizer, resolve_device, resolve_dtype
    from dpolab.tracking import SystemSampler

    run = prepare_run(config, output_dir, resume, engine="trl")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.model)
    model, reference = load_model(config.model), load_model(config.model)
    for m in (model, reference):
        disable_dropout(m)
    datasets, report, _ = prepare_data(config, tokenizer)
    run.write_data_report(report.to_dict())

    last_checkpoint = get_last_checkpoint_or_none(run.checkpoints_dir) if resume else None
    if last_checkpoint:
        step = int(Path(last_checkpoint).name.split("-")[-1])
        logger.info("resuming from %s (step %d)", last_checkpoint, step)
        drop_metrics_after(run, step)
    elif run.metrics_path.exists():
        run.metrics_path.unlink()

    recorder = RunRecorder(run)
    trainer_class = pretokenized_trainer_class()
    with SystemSampler(run) as sampler:
        trainer = trainer_class(
            model=model, ref_model=reference, args=dpo_config(config, run, device, dtype),
            train_dataset=datasets["train"], eval_dataset=datasets["eval"], processing_class=tokenizer,
            callbacks=[recorder, *(callbacks or [])], system_sampler=sampler)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=last_checkpoint)
        wall_time = time.perf_counter() - start
        eval_rows = run.metrics("eval")
        if not eval_rows or eval_rows[-1]["step"] != trainer.state.global_step:
            trainer.evaluate()
            eval_rows = run.metrics("eval")

    if trainer.is_world_process_zero():
        trainer.save_model(str(run.model_dir))
        tokenizer.save_pretrained(str(run.model_dir))
        # TRL scores the reference inside every step: no separate pass, no cache.
        reference_info = {"reference_cache": "none", "reference_time_s": 0.0, "reference_key": None}
        write_summary(run, trainer, recorder, eval_rows[-1], reference_info, wall_time, datasets)
    trainer.accelerator.wait_for_everyone()
    logger.info("run finished: %s", run.path)
    return run
