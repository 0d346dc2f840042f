"""``dpolab evaluate POLICY --reference REF --dataset FILE`` on conversational data with a chat-template
model equals TRL 1.16 ``DPOTrainer.evaluate`` on the same file, which tokenizes it with TRL's own code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.chat_model import build_chat_model
from tests.data.test_formats import as_format, real_pairs

trl = pytest.importorskip("trl")
N_PAIRS = 8
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def test_evaluate_matches_trl_on_conversational_data(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference_dir = build_chat_model(tmp_path / "reference")
    policy = AutoModelForCausalLM.from_pretrained(reference_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    policy.save_pretrained(tmp_path / "policy")
    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    tokenizer.save_pretrained(tmp_path / "policy")
    # Short pairs, so neither side truncates (dpolab's budget is 512 tokens).
    rows = [as_format(p, "conversational") for p in real_pairs(60)
            if len(tokenizer(p["prompt"] + p["chosen"] + p["rejected"]).input_ids) < 200][:N_PAIRS]
    assert len(rows) == N_PAIRS
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    env = {**os.environ, "DPOLAB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dpolab.cli", "evaluate", "policy", "--reference", "reference",
                           "--dataset", "pairs.jsonl", "--output-dir", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads((tmp_path / "out" / "metrics.json").read_text())["pairs"]
    assert ours["pairs"] == N_PAIRS

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, max_length=None, report_to="none",
                         use_cpu=True, bf16=False, per_device_eval_batch_size=N_PAIRS, dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tmp_path / "policy"),
                             ref_model=AutoModelForCausalLM.from_pretrained(reference_dir), args=args,
                             train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    theirs = trainer.evaluate()
    assert abs(ours["rewards/margins"]) > 1e-3  # a policy equal to its reference would prove nothing
    for key in METRICS:
        assert abs(ours[key] - theirs[f"eval_{key}"]) <= 1e-4, (key, ours[key], theirs[f"eval_{key}"])
