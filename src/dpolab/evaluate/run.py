"""``evaluate()``: held-out pair metrics + generation eval (+ reward-model win rates) of a finished run.

Writes into ``<run>/evaluation/``:
  metrics.json       {"pairs": {...}, "generation": {...}, "judge": {...} | null}
  generations.jsonl  one object per prompt: prompt, policy, reference, chosen (+ judge scores)
With a judge, ``summary.json`` also gets ``win_rate`` (vs the reference) so the model card shows it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from dpolab.config import TrainConfig
from dpolab.data import prepare_eval_pairs
from dpolab.errors import ConfigError, RunFolderError
from dpolab.evaluate.generation import RewardJudge, generate_answers, judge_rows, win_rate_summary
from dpolab.evaluate.pairs import held_out_pairs, pair_metrics
from dpolab.hh import SAMPLING
from dpolab.model import load_frozen, load_tokenizer, prepare_device
from dpolab.precision import uses_bf16_weights
from dpolab.runs import append_jsonl, resolve_run, write_json
from dpolab.scoring.collate import choose_packed

logger = logging.getLogger(__name__)


def evaluate(path: str | Path, n_prompts: int = 16, judge: str | None = None, seed: int = 0,
             max_new_tokens: int = 64, temperature: float = SAMPLING["temperature"], top_p: float = SAMPLING["top_p"],
             output_dir: str | Path | None = None, loss_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the run at ``path`` (a sweep folder: its best trial). Returns what metrics.json holds.
    ``loss_overrides``: TrainConfig loss fields scoring the pairs instead of the run's own."""
    run = resolve_run(path)
    if not run.has_model():
        raise RunFolderError(f"{run.path}: no final model (training unfinished?)")
    config = TrainConfig.from_dict(run.config(), source=str(run.config_path))
    config = dataclasses.replace(config, **(loss_overrides or {}))
    recorded = run.resolved()
    # The run's own record says what it was: its reference, precision and batch layout, and the
    # tokenizer saved with its model carries the chat template it trained with.
    reference_name = None if config.reference_free else (run.reference_model() or config.model)
    device = prepare_device(recorded.get("device", config.device))
    dtype = recorded.get("dtype", "fp32")
    tokenizer = load_tokenizer(str(run.model_dir))
    # CPU bf16 runs trained (and scored their reference) with bf16 weights: evaluate the same way.
    weights = torch.bfloat16 if uses_bf16_weights(device, dtype) else torch.float32
    policy = load_frozen(str(run.model_dir), device, weights)
    reference = None if reference_name is None else load_frozen(reference_name, device, weights)
    eval_dataset, data_key = held_out_pairs(config, tokenizer)
    if recorded.get("data_key") and data_key != recorded["data_key"]:
        logger.warning("the held-out data differs from what %s trained on (data key %s, recorded %s): "
                       "its files changed since", run.path, data_key, recorded["data_key"])

    result: dict[str, Any] = {"run": str(run.path), "base_model": config.model, "reference": reference_name,
                              "dtype": dtype}
    packed = recorded.get("batch_layout", "padded") == "packed"
    result["pairs"] = pair_metrics(policy, reference, eval_dataset, config, tokenizer.pad_token_id, packed)
    logger.info("held-out pairs: loss %.4f, reward accuracy %.3f, margin %.4f", result["pairs"]["loss"],
                result["pairs"]["rewards/accuracies"], result["pairs"]["rewards/margins"])

    rows = generate_answers(policy, reference, tokenizer, eval_dataset, n_prompts, seed=seed,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    result["generation"] = {"n_prompts": len(rows), "seed": seed, "max_new_tokens": max_new_tokens,
                            "temperature": temperature, "top_p": top_p, "file": "generations.jsonl"}
    result["judge"] = judge_rows(RewardJudge(judge, device=device), rows) if judge else None

    out = Path(output_dir) if output_dir else run.evaluation_dir
    out.mkdir(parents=True, exist_ok=True)
    generations = out / "generations.jsonl"
    generations.unlink(missing_ok=True)
    for row in rows:
        append_jsonl(generations, row)
    write_json(out / "metrics.json", result)
    if result["judge"]:
        vs_ref = result["judge"]["vs_reference"]
        logger.info("win rate vs reference %.3f [%.3f, %.3f]; vs chosen %.3f", vs_ref["win_rate"],
                    *vs_ref["ci95"], result["judge"]["vs_chosen"]["win_rate"])
        summary = {k: v for k, v in run.summary().items() if k != "format"}
        summary["win_rate"] = win_rate_summary(result["judge"])
        run.write_summary(summary)
    return result


def evaluate_model(model: str, reference: str | None, dataset: str, split: str = "train", beta: float = 0.1,
                   output_dir: str | Path = "evaluation", **data_options: Any) -> dict[str, Any]:
    """Score any model (folder, run, export or Hub id) against ``reference`` on every pair of
    ``dataset`` (any source and format training reads; ``split`` of a Hub / save_to_disk dataset).
    Rendered with the policy's tokenizer, whose chat template (if any) is how it was trained.
    ``data_options`` are TrainConfig fields: the data's (format, columns) and the loss's (loss_type,
    ld_alpha, ...); a reference-free loss needs no ``reference``.
    Writes ``OUTPUT_DIR/metrics.json`` (the same ``pairs`` metrics as a run's evaluation)."""
    try:
        run = resolve_run(model)
    except RunFolderError:
        source = model
    else:
        source = str(run.model_dir)
    config = TrainConfig(model=reference or source, dataset=dataset, split=split, beta=beta, **data_options)
    if reference is None and not config.reference_free:
        raise ConfigError("--dataset needs --reference MODEL (the model the rewards are measured against)")
    device = prepare_device(config.device)
    tokenizer = load_tokenizer(source)
    pairs, report = prepare_eval_pairs(config, tokenizer)
    policy = load_frozen(source, device)
    ref = None if config.reference_free else load_frozen(reference, device)
    packed = all(choose_packed(config.batch_layout, device, m) for m in (policy, ref) if m is not None)
    result = {"model": model, "reference": reference, "dataset": dataset, "split": split,
              "pairs": pair_metrics(policy, ref, pairs, config, tokenizer.pad_token_id, packed),
              "data_report": report.to_dict(), "generation": None, "judge": None}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    return result
