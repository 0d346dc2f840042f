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

One semantic difference: ``label_smoothing`` has no meaning for TRL 1.16's ``sigmoid`` loss, so
cDPO is refused rather than silently ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dpolab.config import TrainConfig
from dpolab.data import bind_template, prepare_data
from dpolab.errors import ConfigError
from dpolab.lifecycle import fit, prepare_run, record_setup, training_argument_kwargs
from dpolab.model import disable_dropout, load_model, load_tokenizer, prepare_device
from dpolab.runs import RunFolder
from dpolab.samples import sample_callbacks
from dpolab.scoring.collate import PreferenceCollator
from dpolab.stage_setup import StageSetup, resolve_dtype, resolved_settings

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
    """``DPOTrainer`` that trains on our token ids as they are and counts pairs/tokens like DpolabTrainer.

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
            if model.training:  # same definitions as DpolabTrainer: pairs and real (attended) tokens
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

    ``gradient_checkpointing`` and ``bf16`` follow our config (TRL's defaults are on / on):
    the same config must mean the same compute in both engines.
    """
    trl = import_trl()
    names = [name for name, _ in config.loss_terms]
    if config.label_smoothing and "sigmoid" in names:
        raise ConfigError("engine 'trl': label_smoothing (cDPO) is not part of TRL 1.16's 'sigmoid' loss; "
                          "use engine 'dpolab' or set label_smoothing 0")
    if "simpo" in names or config.rdpo_alpha:
        raise ConfigError("engine 'trl': SimPO and R-DPO (rdpo_alpha) are not TRL 1.16 DPOTrainer losses; "
                          "use engine 'dpolab'")
    kwargs = training_argument_kwargs(config, run, device, dtype)
    kwargs.update(
        beta=config.beta,
        # TRL 1.16 has no rpo_alpha argument: RPO is its "sft" loss added with weight alpha (loss_terms).
        loss_type=names,
        loss_weights=[weight for _, weight in config.loss_terms],
        label_smoothing=config.label_smoothing,
        ld_alpha=config.ld_alpha,
        use_weighting=config.use_weighting,
        f_divergence_type=config.f_divergence_type,
        f_alpha_divergence_coef=config.f_alpha_divergence_coef,
        discopop_tau=config.discopop_tau,
        max_length=config.max_length,
        precompute_ref_log_probs=False,
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
    start = prepare_run(config, output_dir, resume, engine="trl")
    if start.finished:
        return start.run
    run = start.run
    with start.removed_on_failure():
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = prepare_device(config.device)
        tokenizer = load_tokenizer(config.model)
        formatter = bind_template(tokenizer, config.chat_template)
        model, reference = load_model(config.model), load_model(config.ref_model or config.model)
        for m in (model, reference):
            disable_dropout(m)
        datasets, report, data_key = prepare_data(config, tokenizer)
        if start.recorded:
            dtype, dtype_choice = start.recorded["dtype"], {**start.recorded["dtype_choice"], "resumed": True}
        else:
            collate = PreferenceCollator(tokenizer.pad_token_id, packed=False)
            dtype, dtype_choice = resolve_dtype(config, device, model, datasets["train"], collate)
        settings = resolved_settings(config, device, dtype, dtype_choice, False, formatter, data_key)
        # TRL scores the reference inside every step: no separate pass, no cache.
        settings.reference = {"model": config.ref_model or config.model,
                              "role": "ref_model" if config.ref_model else "starting model", "key": None}
        setup = StageSetup(tokenizer, formatter, model, datasets, report, settings)
        record_setup(run, setup)
    trainer_class = pretokenized_trainer_class()

    def make_trainer(trainer_callbacks: list[Any], sampler: Any) -> Any:
        return trainer_class(
            model=model, ref_model=reference, args=dpo_config(config, run, device, dtype),
            train_dataset=datasets["train"], eval_dataset=datasets["eval"], processing_class=tokenizer,
            callbacks=[*trainer_callbacks, *sample_callbacks(config, run, setup, None, config.beta)],
            system_sampler=sampler)

    reference_info = {"reference_cache": "none", "reference_time_s": 0.0, "reference_key": None}
    return fit(run, config, make_trainer, tokenizer=tokenizer, datasets=datasets, resume=resume,
               summary_extra={**reference_info, "batch_layout": "padded", "dtype": dtype}, callbacks=callbacks)
