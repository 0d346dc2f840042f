"""Samples while training: 2 evaluations x N prompts in samples.jsonl, the reference's answers once,
and a LoRA policy's reference = its base with the adapter disabled (no second model)."""

from __future__ import annotations

import html

import pytest

from dpolab.dpo.trainer import train
from dpolab.report import write_report
from tests.conftest import tiny_config

N = 3


@pytest.mark.slow
def test_two_evaluations_write_two_times_n_rows(tmp_path):
    common = dict(max_steps=2, eval_steps=1, max_train_pairs=16, max_eval_pairs=8, sample_prompts=N,
                  sample_max_new_tokens=12, learning_rate=5e-3)
    full = train(tiny_config(**common, cache_dir=str(tmp_path / "cache-a")), tmp_path / "full")
    rows = full.samples()
    assert [r["step"] for r in rows] == [1] * N + [2] * N
    assert [r["index"] for r in rows] == list(range(N)) * 2
    assert all(r["prompt"].rstrip().endswith("Assistant:") for r in rows)
    assert all(isinstance(r["policy"], str) and isinstance(r["reference"], str) for r in rows)
    # The reference answers once: the same text at every evaluation.
    assert [r["reference"] for r in rows[:N]] == [r["reference"] for r in rows[N:]]
    rewards = [r["reward"] for r in rows if r["reward"] is not None]
    assert rewards and any(abs(x) > 1e-6 for x in rewards)  # the policy moved away from its reference
    assert full.samples(step=-1) == rows[N:]
    # Each answer's length in tokens, as the text it is (verbosity drift).
    from dpolab.model import load_tokenizer

    tokenizer = load_tokenizer("tiny-gpt2")
    assert all(r["policy_tokens"] == len(tokenizer.encode(" " + r["policy"]) if r["policy"] else [])
               and r["reference_tokens"] == len(tokenizer.encode(" " + r["reference"]) if r["reference"] else [])
               for r in rows)
    # The report shows each trial's latest samples.
    page = write_report(full.path).read_text()
    assert "Samples (latest evaluation)" in page and all(html.escape(r["policy"]) in page for r in rows[N:])
    assert (full.path / "report" / "sample_lengths.png").is_file() and "Verbosity drift" in page

    # LoRA, a fresh cache: its reference answers come from the base with the adapter disabled, and
    # equal the full run's (same base weights, same seeds).
    lora = train(tiny_config(**common, lora_r=4, cache_dir=str(tmp_path / "cache-b")), tmp_path / "lora")
    assert [r["reference"] for r in lora.samples(step=1)] == [r["reference"] for r in rows[:N]]
