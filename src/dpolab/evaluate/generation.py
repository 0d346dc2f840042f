"""Generation eval: policy and reference answer the same held-out prompts with the same seeded
sampling; a reward model (``--judge``) then says which answer it prefers.

Win rate counts a tie as half a win. Its 95% interval is the Wilson score interval, which stays
inside [0, 1] and is honest for the small N a generation eval usually has.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from tqdm.auto import tqdm

from dpolab.generate import sample_answer
from dpolab.hh import SAMPLING

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_answers(policy, reference, tokenizer, eval_dataset, n_prompts: int, seed: int = 0,
                     max_new_tokens: int = 64, temperature: float = SAMPLING["temperature"],
                     top_p: float = SAMPLING["top_p"]) -> list[dict[str, Any]]:
    """Side-by-side answers for the first ``n_prompts`` held-out prompts.

    Prompt ``i`` is sampled with seed ``seed + i`` for both models, so the two answers differ only
    because the models do (and a rerun gives the same file).
    """
    rows = []
    n = min(n_prompts, len(eval_dataset))
    for i in tqdm(range(n), desc="generation", unit="prompt"):
        item = eval_dataset[i]
        answers = {label: sample_answer(model, tokenizer, item["prompt_ids"], seed + i, max_new_tokens,
                                        temperature, top_p)
                   for label, model in (("policy", policy), ("reference", reference))}
        rows.append({"index": i, "seed": seed + i, "prompt": item["prompt"], "policy": answers["policy"],
                     "reference": answers["reference"], "chosen": item["chosen"].strip(),
                     "rejected": item["rejected"].strip()})
    return rows


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (``successes`` may count ties as 0.5)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def count_wins(scores_a: list[float], scores_b: list[float]) -> dict[str, Any]:
    """How often answer A scores higher than answer B (ties = half), with its 95% interval."""
    wins = sum(a > b for a, b in zip(scores_a, scores_b, strict=True))
    ties = sum(a == b for a, b in zip(scores_a, scores_b, strict=True))
    n = len(scores_a)
    rate = (wins + 0.5 * ties) / n if n else float("nan")
    low, high = wilson_interval(wins + 0.5 * ties, n)
    return {"win_rate": rate, "ci95": [low, high], "wins": wins, "ties": ties, "losses": n - wins - ties, "n": n}


class RewardJudge:
    """A sequence-classification reward model (Hub id or folder): higher score = better answer."""

    def __init__(self, name: str, device: str = "cpu", max_length: int = 1024) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpolab.errors import ConfigError, first_line

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--judge {name}: not a loadable reward model ({first_line(exc)})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"  # keep the answer, drop the oldest context
        self.name, self.device = name, device
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)

    @torch.no_grad()
    def score(self, prompt: str, answer: str) -> float:
        batch = self.tokenizer(prompt + " " + answer, return_tensors="pt", truncation=True,
                               max_length=self.max_length).to(self.device)
        logits = self.model(**batch).logits[0]
        # One output = a scalar reward; two or more = classifier, its last class is "good".
        return float(logits[0] if logits.numel() == 1 else logits[-1] - logits[0])


def judge_rows(judge: RewardJudge, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Score every answer in ``rows`` (in place) and return both win rates."""
    for row in tqdm(rows, desc="judge", unit="prompt"):
        row["scores"] = {key: judge.score(row["prompt"], row[key]) for key in ("policy", "reference", "chosen")}
    policy = [r["scores"]["policy"] for r in rows]
    return {
        "judge": judge.name,
        "vs_reference": count_wins(policy, [r["scores"]["reference"] for r in rows]),
        "vs_chosen": count_wins(policy, [r["scores"]["chosen"] for r in rows]),
    }


def win_rate_summary(judged: dict[str, Any]) -> dict[str, Any]:
    """What ``summary.json``'s ``win_rate`` holds (the model card reads it): the policy's wins over
    the reference, the judge, and the win rate over the dataset's chosen answers."""
    return {**judged["vs_reference"], "judge": judged["judge"], "vs": "reference",
            "vs_chosen": judged["vs_chosen"]["win_rate"]}
