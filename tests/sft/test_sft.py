"""SFT: the loss is the answer tokens' NLL exactly as plain transformers computes it, prompt tokens
give no gradient, held-out NLL falls, and SFT -> DPO runs end to end through the CLI with the SFT
model as the DPO reference (the reference cache key is the SFT weights' fingerprint)."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from dpolab.config import TrainConfig
from dpolab.data import prepare_data
from dpolab.model import build_builtin, disable_dropout, load_model, load_tokenizer, weights_fingerprint
from dpolab.runs import RunFolder
from dpolab.scoring.collate import PreferenceCollator
from dpolab.sft.trainer import SFT_ANSWER, SFTTrainer, train_sft
from tests.chat_model import build_chat_model
from tests.conftest import tiny_config

N_PAIRS = 4


def _plain_transformers_nll(config: TrainConfig) -> float:
    """Mean answer-token NLL of every train pair (one batch), by GPT-2's own forward with labels."""
    pairs = prepare_data(config, load_tokenizer("tiny-gpt2"))[0]["train"]
    batch = PreferenceCollator(50256, answer_keys=SFT_ANSWER)([pairs[i] for i in range(len(pairs))])
    labels = batch["input_ids"].masked_fill(batch["answer_mask"] == 0, -100)  # prompt and padding ignored
    model = build_builtin("tiny-gpt2")  # stock GPT-2 modules: no fused GELU, full (B, T, V) logits
    disable_dropout(model)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.item()


@pytest.mark.slow
def test_first_step_loss_is_the_plain_answer_nll_and_held_out_nll_falls(tmp_path):
    config = tiny_config(stage="sft", max_train_pairs=N_PAIRS, per_device_train_batch_size=N_PAIRS, max_steps=6,
                         eval_steps=3, max_eval_pairs=8, learning_rate=3e-3, cache_dir=str(tmp_path / "cache"))
    run = train_sft(config, tmp_path / "sft")
    first = run.metrics("train")[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(_plain_transformers_nll(config), abs=1e-5)
    evals = run.metrics("eval")
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["loss"] < evals[0]["loss"] < first["loss"]  # held-out answer NLL falls
    info = run.info()
    assert info["stage"] == "sft" and run.summary()["eval"]["loss"] == evals[-1]["loss"]


def test_prompt_tokens_give_no_gradient(tmp_path):
    """The final hidden state at a position feeds only the head there, so its gradient says whether that
    position's next token is a target. Prompt positions get exactly zero; marking one of them as an answer
    token (its label mask) gives it a gradient and changes the loss."""
    config = TrainConfig(max_train_pairs=2, max_eval_pairs=1, seed=2, cache_dir=str(tmp_path))
    pairs = prepare_data(config, load_tokenizer("tiny-gpt2"))[0]["train"]
    batch = PreferenceCollator(50256, answer_keys=SFT_ANSWER)([pairs[0]])
    prompt_len = len(pairs[0]["prompt_ids"])
    model = build_builtin("tiny-gpt2")
    disable_dropout(model)
    engine = SFTTrainer.__new__(SFTTrainer)  # compute_loss only: no Trainer machinery needed
    engine.sft_config, engine.pairs_seen, engine.tokens_seen = config, 0, 0
    engine.accelerator = SimpleNamespace(autocast=nullcontext)  # fp32: the head's autocast is a no-op

    def loss_and_hidden_grad(answer_mask):
        hidden = {}
        hook = model.transformer.ln_f.register_forward_hook(lambda m, i, out: hidden.setdefault("h", out))
        try:
            model.zero_grad()
            loss = engine.compute_loss(model, {**batch, "answer_mask": answer_mask})
            hidden["h"].retain_grad()
            loss.backward()
        finally:
            hook.remove()
        return loss.item(), hidden["h"].grad[0].abs().sum(-1)  # (T,) gradient size per position

    loss, grad = loss_and_hidden_grad(batch["answer_mask"])
    # Position t predicts token t+1: positions 0 .. prompt_len-2 predict prompt tokens.
    assert torch.all(grad[:prompt_len - 1] == 0) and grad[prompt_len - 1:-1].min() > 0
    flipped = batch["answer_mask"].clone()
    flipped[0, prompt_len // 2] = 1  # label one prompt token as a target
    flipped_loss, flipped_grad = loss_and_hidden_grad(flipped)
    assert flipped_grad[prompt_len // 2 - 1] > 0 and flipped_loss != pytest.approx(loss, abs=1e-6)


@pytest.mark.slow
def test_sft_then_dpo_through_the_cli(tmp_path):
    """From a working directory with relative paths, as a user types it."""
    common = ["--max-train-pairs", "16", "--max-eval-pairs", "8", "--max-steps", "2", "--logging-steps", "1",
              "--max-length", "128", "--max-prompt-length", "64", "--cache-dir", "cache"]

    def dpolab(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "dpolab.cli", *args, *common], cwd=tmp_path, check=True,
                       capture_output=True, text=True)

    dpolab("sft", "--output-dir", "runs/sft", "--learning-rate", "3e-3")
    dpolab("train", "--model", "runs/sft", "--output-dir", "runs/dpo")
    sft, dpo = RunFolder.open(tmp_path / "runs/sft"), RunFolder.open(tmp_path / "runs/dpo")

    # Each stage recorded what it resolved; the DPO reference is the SFT model, scored in the DPO
    # run's precision (bf16 where `auto` chose it: the cache key fingerprints those weights).
    recorded = dpo.resolved()
    assert recorded["reference"] == {"model": str(tmp_path / "runs/sft"), "role": "starting model",
                                     "key": dpo.summary()["reference_key"]}
    assert sft.resolved()["dtype"] == recorded["dtype"] == dpo.summary()["dtype"]
    weights = load_model(str(sft.model_dir)).to(torch.bfloat16 if recorded["dtype"] == "bf16" else torch.float32)
    sft_weights = weights_fingerprint(weights)
    assert sft_weights != weights_fingerprint(build_builtin("tiny-gpt2"))
    summary = dpo.summary()
    assert summary["reference_key"].startswith(f"{sft_weights}-")  # the reference is the SFT model
    # The policy starts at its reference, the SFT model: margin 0 up to the rounding of sums of
    # log-probs (hundreds of nats per answer) taken in other batch groupings. Usually exact in fp32,
    # once 4.9e-5 in a full-suite run: a few ulps of one pair's sums, times beta, averaged over the
    # batch. A wrong reference gives margins of 0.1 and more.
    first_margin = dpo.metrics("train")[0]["rewards/margins"]
    assert first_margin == pytest.approx(0.0, abs=1e-4)
    info = dpo.info()
    assert info["previous_stage"]["stage"] == "sft" and info["previous_stage"]["base_model"] == "tiny-gpt2"

    subprocess.run([sys.executable, "-m", "dpolab.cli", "export", "runs/dpo", "export"], cwd=tmp_path, check=True,
                   capture_output=True)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "1. **SFT**: supervised fine-tuning of `tiny-gpt2` on the chosen answers of `hh-rlhf-sample`" in card
    assert "2. **DPO** on `hh-rlhf-sample`" in card and "datasets:\n- Anthropic/hh-rlhf" in card
    assert json.loads((tmp_path / "runs/sft/run.json").read_text())["stage"] == "sft"
    # The report of the DPO run shows both stages.
    subprocess.run([sys.executable, "-m", "dpolab.cli", "report", "runs/dpo"], cwd=tmp_path, check=True,
                   capture_output=True)
    page = (tmp_path / "runs/dpo/report/report.html").read_text()
    assert "Stage 1: SFT (sft)" in page and "Stage 2: DPO" in page


@pytest.mark.slow
def test_a_sweep_sweeps_sft_configs(tmp_path):
    """`stage: sft` in a sweep's base: every trial is an SFT run, best.json picks the lowest held-out NLL."""
    from dpolab.sweep import SweepConfig, run_sweep

    base = dict(stage="sft", model="tiny-gpt2", max_train_pairs=8, max_eval_pairs=4, max_steps=2, eval_steps=2,
                per_device_train_batch_size=4, max_length=128, max_prompt_length=64, cache_dir=str(tmp_path / "cache"))
    sweep = run_sweep(SweepConfig(base=base, trials=[{"name": "lr1e-4", "learning_rate": 1e-4},
                                                     {"name": "lr3e-3", "learning_rate": 3e-3}]), tmp_path / "sweep")
    trials = {t.path.name: t for t in sweep.trials()}
    assert sorted(trials) == ["lr1e-4", "lr3e-3"]
    assert all(t.info()["stage"] == "sft" and "rewards/margins" not in t.summary()["eval"] for t in trials.values())
    losses = {name: t.summary()["eval"]["loss"] for name, t in trials.items()}
    assert sweep.best()["trial"] == min(losses, key=losses.get)


@pytest.mark.slow
def test_sft_binds_its_template_and_trains_cpu_bf16_like_dpo(tmp_path):
    """SFT shares DPO's setup: the run's chat template is bound to the tokenizer saved with the model
    (serve and the next stage render chats as SFT trained), and CPU bf16 trains bf16 weights."""
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}### assistant: {% endif %}")
    model = build_chat_model(tmp_path / "chat")  # its own template is ChatML: the run must not keep it
    config = tiny_config(stage="sft", model=str(model), chat_template=str(template), dtype="bf16", max_steps=1,
                         max_train_pairs=8, max_eval_pairs=4, max_length=128, max_prompt_length=64)
    run = train_sft(config, tmp_path / "sft")
    assert AutoTokenizer.from_pretrained(run.model_dir).chat_template == template.read_text()
    assert run.resolved()["chat_template"]["name"] == str(template)
    assert run.resolved()["dtype"] == "bf16"
    assert json.loads((run.model_dir / "config.json").read_text())["dtype"] == "bfloat16"  # bf16 weights, no autocast
