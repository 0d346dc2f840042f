"""The stages agree on what a run was: train through the CLI, then evaluate, serve and export read
the run's record, and every stage scores the same answer the same way.

Four choices, each with two values, covered pairwise (every pair of values appears in some case):
precision (fp32, bf16), reference (the starting model, a separate --ref-model), prompt format (HH
text with the tiny GPT-2, a ChatML chat template with a tiny Qwen2), full fine-tuning or LoRA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from dpolab.config import TrainConfig
from dpolab.data import prepare_data, resolve_formatter
from dpolab.data.tokenize import _encode
from dpolab.model import build_builtin, load_tokenizer
from dpolab.runs import RunFolder
from dpolab.serve.chat import formatter_for, scored_answer_ids
from dpolab.serve.models import implicit_rewards, load_served_models
from tests.chat_model import build_chat_model

#            dtype   reference    format  LoRA
CASES = [("fp32", "start", "hh", False),
         ("fp32", "other", "chat", True),
         ("bf16", "start", "chat", True),
         ("bf16", "other", "hh", True),
         ("bf16", "other", "chat", False)]

# Implicit rewards (beta x a log-ratio of summed answer log-probs) computed by two code paths.
# fp32: the same numbers up to summation order. bf16: training and the samples score with bf16
# weights, serve with fp32 copies of them; 8 mantissa bits on ~100 summed token log-probs.
REWARD_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
# Held-out metrics: evaluate reloads the saved model (merged LoRA weights, re-saved bf16) and scores
# the same pairs in the same precision and layout as the training's final evaluation (summed
# log-probs of ~250 nats also differ by summation order: relative 1e-6).
METRIC_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}

FLAGS = ["--max-train-pairs", "16", "--max-eval-pairs", "4", "--max-steps", "2", "--eval-steps", "2",
         "--logging-steps", "1", "--per-device-train-batch-size", "4", "--learning-rate", "1e-3",
         "--max-length", "128", "--max-prompt-length", "64", "--sample-prompts", "2",
         "--sample-max-new-tokens", "8", "--cache-dir", "cache"]


def dpolab(cwd: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "dpolab.cli", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def build_other_gpt2(folder: Path) -> Path:
    """A second tiny GPT-2 (other seed, same vocabulary): a separate reference."""
    torch.manual_seed(1)
    model = build_builtin("tiny-gpt2")
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(folder)
    load_tokenizer("tiny-gpt2").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("models")
    return {"hh": {"start": "tiny-gpt2", "other": str(build_other_gpt2(root / "other-gpt2"))},
            "chat": {"start": str(build_chat_model(root / "chat")), "other": str(build_chat_model(root / "chat2", seed=1))}}


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "reference", "prompt_format", "lora"), CASES,
                         ids=["-".join([d, r, f, "lora" if lo else "full"]) for d, r, f, lo in CASES])
def test_stages_agree_on_the_run(tmp_path, models, dtype, reference, prompt_format, lora):
    start, reference_model = models[prompt_format]["start"], models[prompt_format][reference]
    args = ["train", "--model", start, "--dtype", dtype, "--output-dir", "runs/case", *FLAGS]
    if reference == "other":
        args += ["--ref-model", reference_model]
    if lora:
        args += ["--lora-r", "4", "--lora-alpha", "8"]
    dpolab(tmp_path, *args)
    run = RunFolder.open(tmp_path / "runs/case")
    recorded = run.resolved()

    # The record names what was resolved.
    assert (recorded["dtype"], recorded["device"]) == (dtype, "cpu")
    assert recorded["reference"]["model"] == reference_model
    assert recorded["chat_template"]["name"] == ("hh" if prompt_format == "hh" else "tokenizer")
    assert run.summary()["dtype"] == dtype

    # evaluate: the record's reference and precision give back the training's final evaluation.
    dpolab(tmp_path, "evaluate", "runs/case", "--n-prompts", "1", "--max-new-tokens", "4")
    evaluated = json.loads((run.evaluation_dir / "metrics.json").read_text())
    assert (evaluated["reference"], evaluated["dtype"]) == (reference_model, dtype)
    trained = run.summary()["eval"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert evaluated["pairs"][key] == pytest.approx(trained[key], abs=METRIC_TOLERANCE[dtype], rel=1e-6), key

    # serve: the same reference, and the same implicit reward as the training samples gave.
    served = load_served_models(str(run.path))
    assert served.reference.source == reference_model
    samples = run.samples(step=-1)
    config = TrainConfig.from_dict(run.config())
    eval_pairs = prepare_data(config, load_tokenizer(str(run.model_dir)))[0]["eval"]
    tokenizer = served.policy.tokenizer
    for row in samples:
        if row["reward"] is None:
            continue
        prompt_ids = list(eval_pairs[row["index"]]["prompt_ids"])
        served_reward = implicit_rewards(served, prompt_ids, [scored_answer_ids(tokenizer, row["policy"])])[0]
        assert served_reward == pytest.approx(row["reward"], abs=REWARD_TOLERANCE[dtype])
    assert any(row["reward"] is not None for row in samples)

    # serve renders a conversation into the token ids training used for the same conversation.
    chat = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "With flour."},
            {"role": "user", "content": "And water?"}]
    training_formatter = resolve_formatter(load_tokenizer(start), config.chat_template)
    assert _encode(tokenizer, [formatter_for(tokenizer).prompt(chat)]) == _encode(
        load_tokenizer(start), [training_formatter.prompt(chat)])

    # export: the card names the reference, the data, the template and the precision of the record.
    dpolab(tmp_path, "export", "runs/case", "export")
    card = ModelCard.load(tmp_path / "export" / "README.md")
    metadata = card.data.to_dict()
    assert metadata["dpolab_reference_model"] == reference_model
    assert metadata["dpolab_dtype"] == dtype
    assert reference_model in card.text and "hh-rlhf-sample" in card.text
    assert ("in the HH text format" in card.text) == (prompt_format == "hh")
    assert ("trained on chats rendered with" in card.text) == (prompt_format == "chat")
    print(f"\nMATRIX | {dtype} | {reference} | {prompt_format} | {'LoRA' if lora else 'full'} | "
          f"eval loss train {trained['loss']:.5f} / evaluate {evaluated['pairs']['loss']:.5f} | "
          f"sample rewards {[row['reward'] for row in samples]} |")
