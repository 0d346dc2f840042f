"""Run folders for the publishing tests: a finished tiny run, written by hand.

The run is written by hand through ``dpolab.runs`` (the records follow docs/run-folder.md) with the
built-in ``tiny-gpt2`` as its model, so these tests do not depend on the trainer and take
seconds. Values are distinctive (not round) so a card that reads the wrong record fails.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from dpolab.config import TrainConfig
from dpolab.evaluate.generation import count_wins, win_rate_summary
from dpolab.runs import RunFolder
from dpolab.scoring.length import length_metrics

# The length-controlled metrics of eight held-out pairs, as training's evaluation records them.
LENGTH_EVAL = length_metrics(torch.tensor([0.31, -0.12, 0.05, 0.22, -0.4, 0.17, 0.09, -0.02]),
                             torch.tensor([41, 12, 30, 25, 9, 33, 18, 20]), torch.tensor([20, 15, 30, 11, 27, 14, 23, 19]),
                             torch.tensor([170, 50, 121, 99, 35, 140, 70, 83]), torch.tensor([81, 66, 118, 40, 111, 52, 95, 74]))

EVALS = {
    "trial-000": {**LENGTH_EVAL, "loss": 0.6812, "rewards/accuracies": 0.5625, "rewards/margins": 0.0213},
    "trial-001": {**LENGTH_EVAL, "loss": 0.6543, "rewards/accuracies": 0.6875, "rewards/margins": 0.0731},
}
BETAS = {"trial-000": 0.1, "trial-001": 0.3}
# Smallest valid PNG (1x1): the report's plots only need to be copied and linked.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d49444154789c6360000002"
    "0000050001e226059b0000000049454e44ae426082")


# Judge scores of five prompts: the policy beats the reference 3 times, ties once (win rate 0.7).
POLICY_SCORES, REFERENCE_SCORES, CHOSEN_SCORES = [3.0, 1.0, 2.0, 5.0, 0.5], [1.0, 1.0, 5.0, 0.0, 0.0], [4.0] * 5


def make_run(path: Path, eval_metrics: dict, beta: float = 0.1, judged: bool = False,
             base_model: str = "tiny-gpt2", with_model: bool = True, shift: float = 0.0) -> RunFolder:
    """A finished run; ``shift`` is added to every weight so two runs' models differ."""
    from dpolab.model import build_builtin, load_tokenizer

    run = RunFolder.create(path, {"engine": "dpolab", "base_model": base_model, "dataset": "hh-rlhf-sample",
                                  "data_dir": None, "dpolab_version": "0.1.0"})
    config = TrainConfig(beta=beta, max_steps=3, max_train_pairs=24, max_eval_pairs=8, max_length=256,
                         max_prompt_length=128).to_dict()
    run.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run.write_data_report({"source": "hh-rlhf-sample", "files": ["harmless-base/test.jsonl.gz"],
                           "rows_read": 2312, "kept": {"train": 24, "eval": 8},
                           "dropped": {"prompt_mismatch": 3, "empty_answer": 1, "no_assistant_turn": 0},
                           "truncated": {"prompt": 2, "answer": 5}, "max_length": 256, "max_prompt_length": 128})
    if with_model:
        model = build_builtin("tiny-gpt2")
        if shift:
            import torch

            with torch.no_grad():
                for param in model.parameters():
                    param.add_(shift)
        model.save_pretrained(run.model_dir)
        load_tokenizer("tiny-gpt2").save_pretrained(run.model_dir)
    summary = {"train": {"loss": 0.69, "steps": 3, "epochs": 0.5}, "eval": dict(eval_metrics),
               "wall_time_s": 1.25, "train_pairs": 24, "eval_pairs": 8}
    if judged:  # what `dpolab evaluate --judge` adds
        summary["win_rate"] = win_rate_summary({"judge": "tiny-judge",
                                                "vs_reference": count_wins(POLICY_SCORES, REFERENCE_SCORES),
                                                "vs_chosen": count_wins(POLICY_SCORES, CHOSEN_SCORES)})
    run.write_summary(summary)
    return run
