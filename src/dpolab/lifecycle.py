"""The run lifecycle every ``transformers.Trainer``-based stage shares: the DPO engines (dpolab's
and TRL's) and any later training stage (SFT). A stage brings its own ``Trainer`` subclass and
data; this module does the rest:

    StageTrainer         the Trainer base of every stage: system readings in logs, throughput
                         counters, a loss-only evaluation step
    prepare_run()        create the run folder (or check it can be resumed): run.json, config.yaml
    training_arguments() our config as ``TrainingArguments`` (one mapping for every engine)
    fit()                resume, records, trackers, ``Trainer.train``, the final evaluation,
                         the saved model and ``summary.json``

It depends only on the layers below the stages (config, runs, tracking, model), so stages import
it and it imports no stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import dpolab
from dpolab.config import TrainConfig, save_config
from dpolab.errors import ConfigError
from dpolab.lora import save_final_model
from dpolab.model import check_source
from dpolab.precision import master_weight_optimizer
from dpolab.runs import RunFolder, SweepFolder, resolve_run
from dpolab.scoring.logps import batch_logps
from dpolab.stage_setup import StageSetup
from dpolab.tracking import SystemSampler, tracker_session

logger = logging.getLogger(__name__)

# make_trainer(callbacks, system_sampler) -> a ready Trainer on the stage's model and data.
MakeTrainer = Callable[[list[TrainerCallback], SystemSampler], Trainer]



class StageTrainer(Trainer):
    """What every dpolab stage's ``Trainer`` shares (DPO's and SFT's subclass it): the system
    sampler's latest readings in every log, throughput counters for ``summary.json``, and an
    evaluation step that is the loss alone (there are no labels or logits to return)."""

    def __init__(self, *args: Any, system_sampler: SystemSampler | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.system_sampler = system_sampler
        # Stage losses are already means (per pair, per token): let Trainer divide them by the
        # accumulation steps, so 2 micro-batches of 2 give exactly the gradient of one batch of 4.
        self.model_accepts_loss_kwargs = False
        self.pairs_seen = 0
        self.tokens_seen = 0

    def answer_logps(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
        """(S,) summed answer log-probs of a collated batch (:func:`dpolab.scoring.logps.batch_logps`).

        accelerate autocasts only the model's own forward and hands back fp32 outputs: without this
        context the answer-only head (applied after the forward) would run in fp32 under GPU bf16."""
        with self.accelerator.autocast():
            return batch_logps(model, inputs, chunk_size)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.system_sampler is not None:
            logs.update(self.system_sampler.latest())
        super().log(logs, start_time)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # Resuming, Trainer loads the checkpoint with strict=False and warns about every key it lacks.
        # A tied LM head (GPT-2's is its embedding) is saved once, under the embedding's name, so it
        # is always "missing" though loading the embedding restored it: not worth a warning.
        tied = getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or {}
        missing = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))


class EvaluateAtEnd(TrainerCallback):
    """Evaluate at the last optimizer step inside the training loop, so trackers (MLflow closes its
    run when training ends) and the sweep's pruner see the final evaluation. With per-epoch
    evaluation the last epoch's end already does it; a run cut mid-epoch by max_steps is
    evaluated by :func:`fit` afterwards."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy == "steps" and state.global_step >= state.max_steps > 0:
            control.should_evaluate = True
        return control


class LogAtCheckpoints(TrainerCallback):
    """Log a train row at every checkpoint and at the last step, so the train rows of
    ``metrics.jsonl`` cover every step exactly once, also across a resume (the loss of steps
    between the last log and a checkpoint would otherwise be lost with the killed process).
    :func:`train_loss` averages them into the summary's train loss."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_training_stop:
            control.should_log = True
        return control

    on_epoch_end = on_step_end


class AlreadyFinished(Exception):
    """Raised by :class:`StopIfFinished` out of ``Trainer.train`` (caught by :func:`fit`)."""


class StopIfFinished(TrainerCallback):
    """A resume from the checkpoint of the last step must not train: ``Trainer`` takes one more
    step before it checks ``max_steps`` (a kill during the final model save left that checkpoint).
    ``on_train_begin`` runs after Trainer restored weights and state from the checkpoint, under
    every launcher, so stopping there leaves the trained model in place."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise AlreadyFinished()
        return control


class RunRecorder(TrainerCallback):
    """Appends every train log and evaluation to the run folder's ``metrics.jsonl``."""

    def __init__(self, run: RunFolder, elapsed_before: float = 0.0) -> None:
        self.run = run
        # A resumed run's rows go on from the time its checkpoint was reached.
        self.start = time.monotonic() - elapsed_before

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:
            return  # train_runtime: Trainer's end-of-training summary, not a step log
        is_eval = any(k.startswith("eval_") for k in logs)
        row: dict[str, Any] = {"split": "eval" if is_eval else "train", "step": state.global_step,
                               "epoch": round(state.epoch or 0.0, 4), "time_s": round(time.monotonic() - self.start, 3)}
        for key, value in logs.items():
            key = key.removeprefix("eval_")
            if key.startswith("system/") or key in ("runtime", "samples_per_second", "steps_per_second", "epoch"):
                continue
            row[key] = value
        self.run.append_metrics(row)


def stage_training_arguments(config: TrainConfig, run: RunFolder, setup: StageSetup) -> TrainingArguments:
    """:func:`training_arguments` for a stage's resolved settings. CPU bf16 trains bf16 weights, which
    need no autocast on top (it would only convert the outputs back to fp32)."""
    settings = setup.settings
    return training_arguments(config, run, settings.device, "fp32" if setup.bf16_weights else settings.dtype)


def stage_optimizer(trainer_class: type, args: TrainingArguments, setup: StageSetup) -> tuple[type, dict] | None:
    """``Trainer(optimizer_cls_and_kwargs=...)``: AdamW on fp32 master weights for bf16 weights, else
    None (Trainer's own optimizer)."""
    return master_weight_optimizer(trainer_class, args, setup.model) if setup.bf16_weights else None


def record_setup(run: RunFolder, setup: StageSetup) -> None:
    """Write the stage's resolved settings into ``run.json`` (rank 0) and its data report."""
    if int(os.environ.get("RANK", "0")) == 0:
        run.update_info(resolved=setup.settings.to_dict())
        run.write_data_report(setup.data_report.to_dict())


def training_arguments(config: TrainConfig, run: RunFolder, device: str, dtype: str) -> TrainingArguments:
    """Map our config onto ``TrainingArguments`` (one place, so every engine uses the same)."""
    return TrainingArguments(**training_argument_kwargs(config, run, device, dtype))


def training_argument_kwargs(config: TrainConfig, run: RunFolder, device: str, dtype: str) -> dict[str, Any]:
    """The ``TrainingArguments`` fields of our config; subclasses (TRL's ``DPOConfig``) take them too."""
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
        **checkpointing_arguments(config.gradient_checkpointing),
        torch_compile=config.compile,
    )


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """``TrainingArguments``' activation checkpointing fields under the name this transformers uses:
    recent ones renamed ``gradient_checkpointing*`` to ``activation_checkpointing*`` and print a
    FutureWarning for each old name given, on every run."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    # Non-reentrant: works when the inputs need no grad (frozen embeddings under LoRA).
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


# Settings a resumed run may change: how it is logged, checkpointed and evaluated, not what it
# trains. Any other difference from the run's config.yaml is refused.
RESUME_MAY_CHANGE = frozenset({
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "report_to", "run_name", "num_threads",
    "dataset_num_proc", "cache_dir", "per_device_eval_batch_size", "sample_prompts", "sample_max_new_tokens",
    "logps_chunk_size"})


@dataclass
class RunStart:
    """:func:`prepare_run`'s answer: the run folder; ``recorded``, the resolved settings of the run
    being resumed (None for a new run); ``finished``, a resume of a run that already finished (the
    stage returns it untouched)."""

    run: RunFolder
    recorded: dict[str, Any] | None = None
    finished: bool = False
    new_run: bool = False  # this call started the run (wrote run.json and config.yaml)
    made_folder: bool = False  # ... in a folder it created

    @contextmanager
    def removed_on_failure(self) -> Iterator[None]:
        """Around a new run's setup (model, data, reference pass): if it fails, the records this
        call wrote go again, so no half-made run folder is left for report, serve or a sweep to
        take for a run. A resumed run keeps everything."""
        try:
            yield
        except BaseException:
            if self.new_run:
                if self.made_folder:
                    shutil.rmtree(self.run.path, ignore_errors=True)
                else:
                    for record in (self.run.identity_path, self.run.config_path, self.run.data_report_path):
                        record.unlink(missing_ok=True)
            raise


def prepare_run(config: TrainConfig, output_dir: str | Path, resume: bool, engine: str) -> RunStart:
    """Create the run folder (or check it can be resumed) and write run.json + config.yaml.

    ``engine`` is what trains it (``config.engine`` for DPO), recorded in run.json. A resume must
    train what the run trained: settings outside :data:`RESUME_MAY_CHANGE` that differ from the
    run's config are refused in one line; allowed changes are recorded in run.json's ``resumes``.
    """
    for model in (config.model, config.ref_model):  # a model that cannot load fails before any folder is made
        if model:
            check_source(model)
    output_dir = Path(output_dir)
    if resume and not RunFolder.is_run(output_dir):  # a mistyped folder must not quietly start from scratch
        raise ConfigError(f"--resume: {output_dir} holds no run to resume; drop --resume to start a new run there")
    if RunFolder.is_run(output_dir) and not resume:
        if RunFolder(output_dir).is_finished():
            raise ConfigError(f"{output_dir}: a finished run is already there; choose another --output-dir")
        if last_complete_checkpoint(RunFolder(output_dir)):
            raise ConfigError(f"{output_dir}: an unfinished run with checkpoints is there; add --resume to continue it")
    if resume:
        return resume_run(RunFolder.open(output_dir), config)
    made_folder = not output_dir.exists()
    run = RunFolder.create(output_dir, {
        "engine": engine, "stage": config.stage, "base_model": config.model, "dataset": config.dataset,
        "data_dir": config.data_dir, "reference_model": config.ref_model or config.model,
        **previous_stage(config.model), "dpolab_version": dpolab.__version__})
    save_config(config, run.config_path)
    return RunStart(run, new_run=True, made_folder=made_folder)


def resume_run(run: RunFolder, config: TrainConfig) -> RunStart:
    """Check ``config`` against the run's own and return how to continue it (see :func:`prepare_run`)."""
    trained = run.config()
    new = config.to_dict()
    changed = {key: [trained.get(key), value] for key, value in new.items() if trained.get(key) != value}
    refused = {key: pair for key, pair in changed.items() if key not in RESUME_MAY_CHANGE}
    if refused:
        asked = ", ".join(f"{key} {value!r}" for key, (_, value) in refused.items())
        trained_with = ", ".join(f"{key} {old!r}" for key, (old, _) in refused.items())
        raise ConfigError(f"--resume: this command sets {asked}, but {run.path} was trained with {trained_with}; "
                          f"a resume continues the same training (use a new --output-dir to change "
                          f"{'it' if len(refused) == 1 else 'them'})")
    info = run.info()
    if run.is_finished():
        logger.info("%s already finished: nothing to resume, its records are left as they are", run.path)
        return RunStart(run, info.get("resolved"), finished=True)
    if changed:
        checkpoint = last_complete_checkpoint(run)
        step = int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
        run.update_info(resumes=[*info.get("resumes", []), {"from_step": step, "changed": changed}])
        save_config(config, run.config_path)
    return RunStart(run, info.get("resolved"))


def previous_stage(model: str) -> dict[str, Any]:
    """``{"previous_stage": run.json of the run it starts from}`` when ``model`` is a dpolab run or
    sweep folder (SFT -> DPO), so the records (and the model card) name both stages and datasets
    even after the folders move; else ``{}``."""
    if not (RunFolder.is_run(model) or SweepFolder.is_sweep(model)):
        return {}
    return {"previous_stage": resolve_run(model).info()}


def last_complete_checkpoint(run: RunFolder) -> str | None:
    """Newest checkpoint that was fully written. Trainer writes ``trainer_state.json`` last, so a
    run killed while saving leaves a newer folder without it (or with a torn one): skip those."""
    for checkpoint in run.checkpoints():
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            logger.warning("ignoring incomplete checkpoint %s (killed while saving?)", checkpoint)
            continue
        return str(checkpoint)
    return None


def drop_metrics_after(run: RunFolder, step: int) -> None:
    """On resume, forget rows logged after the checkpoint: they will be logged again."""
    run.rewrite_metrics([r for r in run.metrics() if r["step"] <= step])


def train_loss(train_rows: list[dict[str, Any]]) -> float | None:
    """Mean loss over every optimizer step: each train row's loss is the mean over the steps since
    the previous row (see :class:`LogAtCheckpoints`), so weight it by that count."""
    total, previous_step = 0.0, 0
    for row in train_rows:
        total += row["loss"] * (row["step"] - previous_step)
        previous_step = row["step"]
    return total / previous_step if previous_step else None


def fit(run: RunFolder, config: TrainConfig, make_trainer: MakeTrainer, *, tokenizer: Any,
        datasets: Any, resume: bool, summary_extra: dict[str, Any] | None = None,
        callbacks: list[TrainerCallback] | None = None) -> RunFolder:
    """Train and finish the run folder: resume from the last complete checkpoint, record metrics
    and system samples, run the trackers, evaluate at the end, save model + tokenizer, and write
    ``summary.json`` (``summary_extra`` adds stage keys, e.g. the reference pass).

    ``callbacks`` are extra ``TrainerCallback``s (the sweep's pruning callback).
    """
    last_checkpoint = last_complete_checkpoint(run) if resume else None
    elapsed_before = 0.0  # training time the run had spent up to its checkpoint
    if last_checkpoint:
        step = int(Path(last_checkpoint).name.split("-")[-1])
        logger.info("resuming from %s (step %d)", last_checkpoint, step)
        drop_metrics_after(run, step)
        elapsed_before = max((row["time_s"] for row in run.metrics()), default=0.0)
    else:
        run.rewrite_metrics([])

    with tracker_session(config.report_to, run.path), SystemSampler(run) as sampler:
        trainer = make_trainer([StopIfFinished(), RunRecorder(run, elapsed_before), LogAtCheckpoints(), EvaluateAtEnd(),
                                *(callbacks or [])], sampler)
        start = time.perf_counter()
        try:
            trainer.train(resume_from_checkpoint=last_checkpoint)
        except AlreadyFinished:
            logger.info("%s is the last step's checkpoint: nothing left to train", last_checkpoint)
            trainer.is_in_train = False
        wall_time = time.perf_counter() - start
        eval_rows = run.metrics("eval")
        if not eval_rows or eval_rows[-1]["step"] != trainer.state.global_step:
            trainer.evaluate()
            eval_rows = run.metrics("eval")

    # Every rank: under FSDP gathering the full state dict is a collective (Trainer writes on rank 0 only).
    save_final_model(trainer, run, config.model)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run.model_dir))
        write_summary(run, trainer, eval_rows[-1], wall_time, elapsed_before, datasets, summary_extra or {})
    trainer.accelerator.wait_for_everyone()
    logger.info("run finished: %s", run.path)
    return run


def write_summary(run: RunFolder, trainer: Trainer, final_eval: dict[str, Any], wall_time: float,
                  elapsed_before: float, datasets: Any, extra: dict[str, Any]) -> None:
    """``summary.json``. ``wall_time``: this session's; ``elapsed_before``: the training time up to
    the checkpoint it resumed from (0 for an uninterrupted run), so ``wall_time_s`` is the run's.
    Throughput is this session's: pairs_seen / tokens_seen are counted by the stage's Trainer in
    this process."""
    pairs = getattr(trainer, "pairs_seen", 0) * trainer.args.world_size
    tokens = getattr(trainer, "tokens_seen", 0) * trainer.args.world_size
    eval_metrics = {k: v for k, v in final_eval.items() if k not in ("split", "time_s")}
    run.write_summary({
        "train": {"loss": train_loss(run.metrics("train")), "steps": trainer.state.global_step,
                  "epochs": round(trainer.state.epoch or 0.0, 4)},
        "eval": eval_metrics,
        "wall_time_s": round(elapsed_before + wall_time, 3),
        **extra,
        "train_pairs": len(datasets["train"]),
        "eval_pairs": len(datasets["eval"]),
        "pairs_per_s": round(pairs / wall_time, 3) if pairs else None,
        "tokens_per_s": round(tokens / wall_time, 1) if tokens else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    })


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    if os.name != "posix":  # no getrusage there: the current RSS is the best we have
        return psutil.Process().memory_info().rss / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
