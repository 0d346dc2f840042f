"""Samples while training: at every evaluation the policy answers N fixed held-out prompts.

Each prompt ``i`` is sampled with seed ``seed + i`` at every evaluation, so the answers change only
because the model does. The reference answers the same prompts once (cached on disk, keyed by
the reference's weights and the prompts); each row also carries the implicit reward of the
policy's answer, beta * (log pi(y|x) - log pi_ref(y|x)).

Rows go to ``RUN/samples.jsonl`` and, as a table, to each active tracker: a W&B Table, an MLflow
table artifact (``samples/step_NNNNNN.json``), TensorBoard text (``RUN/tensorboard/samples/``).
Each row also counts the tokens of both answers; their means per evaluation (verbosity drift: does
the policy grow wordier than its reference?) go to every tracker as ``eval/samples/policy_tokens``
and ``eval/samples/reference_tokens`` (MLflow: ``eval_samples/...``) and into the report's plot.

Scoring the policy's answer needs the reference: a LoRA policy disables its adapter for that (no
second model); otherwise the frozen reference is loaded once, on the first evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from dpolab.config import TrainConfig
from dpolab.data import default_cache_dir
from dpolab.data.templates import Formatter
from dpolab.data.tokenize import answer_ids
from dpolab.generate import sample_answer
from dpolab.lora import uses_lora
from dpolab.model import load_frozen
from dpolab.runs import RunFolder
from dpolab.scoring.pairs import prompt_answer_logps
from dpolab.stage_setup import StageSetup

logger = logging.getLogger(__name__)

COLUMNS = ["step", "prompt", "policy", "reference", "reward"]
LENGTH_METRICS = {"policy_tokens": "samples/policy_tokens", "reference_tokens": "samples/reference_tokens"}


class SampleRecorder(TrainerCallback):
    """Generates, scores and records the samples at each evaluation (main process only).

    Args:
        run: the run folder (``samples.jsonl`` lives there).
        tokenizer: the policy's tokenizer.
        formatter: how the run renders conversations (answers are tokenized as training did).
        prompts: the N held-out prompts, as token ids.
        reference_name: what ``load_model`` loads as the frozen reference; None: the policy is a
            LoRA model whose base (adapter disabled) is the reference.
        beta: DPO's beta; None (SFT) records no reward.
        seed: prompt ``i`` is sampled with ``seed + i``.
        cache_key: names the reference's weights (the reference pass's key); None = no disk cache.
        cache_dir: where the reference answers are cached.
        report_to: the active trackers.
    """

    def __init__(self, run: RunFolder, tokenizer, formatter: Formatter, prompts: list[list[int]], reference_name: str | None,
                 beta: float | None, seed: int, max_new_tokens: int, cache_key: str | None, cache_dir: Path,
                 report_to: list[str]) -> None:
        self.run = run
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.prompts = prompts
        self.reference_name = reference_name
        self.beta = beta
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.cache_key = cache_key
        self.cache_dir = cache_dir
        self.report_to = report_to
        self._reference: torch.nn.Module | None = None
        self._reference_answers: list[str] | None = None

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        was_training = model.training
        model.eval()
        try:
            rows = self.samples(model, state.global_step)
        finally:
            model.train(was_training)
        self.run.append_samples(rows)
        log_to_trackers(rows, state.global_step, self.report_to, self.run.path)

    def samples(self, model: torch.nn.Module, step: int) -> list[dict[str, Any]]:
        reference_answers = self.reference_answers(model)
        rows = []
        for i, prompt_ids in enumerate(self.prompts):
            answer = sample_answer(model, self.tokenizer, prompt_ids, self.seed + i, self.max_new_tokens)
            rows.append({"step": step, "index": i, "prompt": self.tokenizer.decode(prompt_ids),
                         "policy": answer, "reference": reference_answers[i],
                         "reward": self.reward(model, prompt_ids, answer),
                         "policy_tokens": self.answer_tokens(answer),
                         "reference_tokens": self.answer_tokens(reference_answers[i])})
        return rows

    def answer_tokens(self, answer: str) -> int:
        """A sampled answer's length as the length metrics count it: its tokens as trained, the
        appended EOS not counted (a chat template's end-of-turn token is)."""
        if not answer:
            return 0
        return len(answer_ids(self.tokenizer, self.formatter, answer)) - (0 if self.formatter.is_chat else 1)

    def reference_model(self, model: torch.nn.Module):
        """(model, context) that computes the reference: the LoRA policy with its adapter off, or the
        separately loaded frozen reference."""
        if self.reference_name is None:
            return model, model.disable_adapter()
        if self._reference is None:
            # Same device and precision as the policy: the reference pass scored with the run's dtype.
            policy_param = next(model.parameters())
            self._reference = load_frozen(self.reference_name, policy_param.device, policy_param.dtype)
        return self._reference, nullcontext()

    def reference_answers(self, model: torch.nn.Module) -> list[str]:
        if self._reference_answers is not None:
            return self._reference_answers
        path = self._cache_path()
        if path is not None and path.exists():
            self._reference_answers = json.loads(path.read_text())
            return self._reference_answers
        reference, context = self.reference_model(model)
        with context:
            answers = [sample_answer(reference, self.tokenizer, ids, self.seed + i, self.max_new_tokens)
                       for i, ids in enumerate(self.prompts)]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(answers))
            os.replace(tmp, path)  # atomic: sweep workers may race here
        self._reference_answers = answers
        return answers

    def reward(self, model: torch.nn.Module, prompt_ids: list[int], answer: str) -> float | None:
        """beta * (log pi - log pi_ref) of ``answer``, tokenized exactly as training scores an
        answer (:func:`answer_ids`: HH text + EOS, or the chat template's assistant turn), so the
        reward is the one the loss, ``dpolab evaluate`` and the web app compute for the same text."""
        if self.beta is None or not answer:
            return None
        ids = [answer_ids(self.tokenizer, self.formatter, answer)]
        pad = self.tokenizer.pad_token_id
        policy_logp = prompt_answer_logps(model, prompt_ids, ids, pad)[0]
        reference, context = self.reference_model(model)
        with context:
            reference_logp = prompt_answer_logps(reference, prompt_ids, ids, pad)[0]
        return round(self.beta * (policy_logp - reference_logp), 6)

    def _cache_path(self) -> Path | None:
        if self.cache_key is None:
            return None
        digest = hashlib.sha256(json.dumps([self.prompts, self.seed, self.max_new_tokens]).encode()).hexdigest()[:16]
        return self.cache_dir / "samples" / f"{self.cache_key}-{digest}.json"


def mean_lengths(rows: list[dict[str, Any]]) -> dict[str, float]:
    """One evaluation's mean sample lengths in tokens, ``{"samples/policy_tokens", "samples/reference_tokens"}``."""
    return {name: sum(row[key] for row in rows) / len(rows) for key, name in LENGTH_METRICS.items()}


def log_to_trackers(rows: list[dict[str, Any]], step: int, report_to: list[str], run_dir: Path) -> None:
    """The rows as one table per evaluation in each active tracker, and their mean lengths as metrics
    named as the trackers name the evaluation's own (``eval/...``; MLflow ``eval_...``)."""
    data = [[row[c] for c in COLUMNS] for row in rows]
    lengths = {f"eval/{name}": value for name, value in mean_lengths(rows).items()}
    wandb = sys.modules.get("wandb")
    if "wandb" in report_to and wandb is not None and wandb.run is not None:
        # transformers' W&B callback steps every metric by train/global_step: log the table the same way.
        wandb.run.log({"samples": wandb.Table(columns=COLUMNS, data=data), **lengths, "train/global_step": step})
    mlflow = sys.modules.get("mlflow")
    if "mlflow" in report_to and mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_table({c: [row[c] for row in rows] for c in COLUMNS}, artifact_file=f"samples/step_{step:06d}.json")
        mlflow.log_metrics({name.replace("/", "_", 1): value for name, value in lengths.items()}, step=step)
    trackio = sys.modules.get("trackio")
    if "trackio" in report_to and trackio is not None and trackio.context_vars.current_run.get() is not None:
        trackio.log({**lengths, "train/global_step": step})
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        # A sub-folder: TensorBoard shows it as its own run, and the metrics' event file stays one writer's.
        log_dir = Path(os.environ.get("TENSORBOARD_LOGGING_DIR", run_dir / "tensorboard")) / "samples"
        with SummaryWriter(log_dir=str(log_dir)) as writer:
            writer.add_text("samples", markdown_table(data), step)
            for name, value in lengths.items():
                writer.add_scalar(name, value, step)


def markdown_table(data: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


def sample_callbacks(config: TrainConfig, run: RunFolder, setup: StageSetup,
                     reference_key: str | None, beta: float | None) -> list[TrainerCallback]:
    """``[SampleRecorder]`` for the first ``config.sample_prompts`` held-out prompts (the eval split's
    order is fixed by the seeded split), or ``[]`` when samples are off. The reference is the one the
    stage resolved (``setup.settings.reference``; SFT: its starting model)."""
    if not config.sample_prompts:
        return []
    eval_dataset = setup.datasets["eval"]
    n = min(config.sample_prompts, len(eval_dataset))
    prompts = [list(ids) for ids in eval_dataset.select(range(n))["prompt_ids"]]
    reference_name = setup.settings.reference.get("model") or setup.settings.model
    if uses_lora(config) and not config.ref_model:
        reference_name = None  # the LoRA policy with its adapter off is the reference
    return [SampleRecorder(run, setup.tokenizer, setup.formatter, prompts, reference_name, beta, config.seed,
                           config.sample_max_new_tokens, reference_key, Path(config.cache_dir or default_cache_dir()),
                           config.report_to)]
