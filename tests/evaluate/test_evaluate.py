"""``dpolab evaluate``: held-out pair metrics recomputed from the saved model, seeded side-by-side
generations, and reward-model win rates with a 95% interval."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from dpolab.evaluate.generation import count_wins, wilson_interval
from dpolab.generate import cut_answer
from dpolab.runs import RunFolder, read_appended_jsonl


def test_wilson_interval_and_win_rate_counting():
    low, high = wilson_interval(8, 10)
    assert math.isclose(low, 0.4902, abs_tol=1e-3) and math.isclose(high, 0.9433, abs_tol=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    result = count_wins([3.0, 1.0, 2.0, 0.5], [1.0, 1.0, 5.0, 0.0])
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (2, 1, 1, 4)
    assert result["win_rate"] == 2.5 / 4
    assert result["ci95"][0] < result["win_rate"] < result["ci95"][1]
    assert cut_answer(" Sure, here it is.\n\nHuman: thanks\n\nAssistant: ok") == "Sure, here it is."


@pytest.fixture()
def judge_dir(tmp_path):
    """A tiny GPT-2 reward model (one score output), saved like a Hub reward model."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from dpolab.model import load_tokenizer

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=50257, n_embd=32, n_layer=1, n_head=2, n_positions=1024, num_labels=1,
                        pad_token_id=50256)
    path = tmp_path / "judge"
    GPT2ForSequenceClassification(config).save_pretrained(path)
    load_tokenizer("tiny-gpt2").save_pretrained(path)
    return path


@pytest.mark.slow
def test_evaluate_run_with_judge(tiny_run, tmp_path, judge_dir):
    from dpolab.evaluate import evaluate
    from dpolab.evaluate.generation import RewardJudge

    run = RunFolder.open(shutil.copytree(tiny_run.path, tmp_path / "run"))  # evaluate writes into the run
    result = evaluate(run.path, n_prompts=4, judge=str(judge_dir), seed=7, max_new_tokens=8)

    # Same model, same held-out pairs: the numbers training logged at its final eval.
    pairs = result["pairs"]
    final = run.summary()["eval"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert math.isclose(pairs[key], final[key], rel_tol=1e-4, abs_tol=1e-5), key
    assert pairs["pairs"] == run.summary()["eval_pairs"]
    assert pairs["logps/chosen_minus_ref"] == pytest.approx(pairs["logps/chosen"] - pairs["logps/ref_chosen"], abs=1e-3)

    rows = read_appended_jsonl(run.path / "evaluation" / "generations.jsonl")
    assert len(rows) == 4 and [r["seed"] for r in rows] == [7, 8, 9, 10]
    assert all(r["prompt"].endswith("Assistant:") and r["chosen"] and "policy" in r and "reference" in r for r in rows)
    assert json.loads((run.path / "evaluation" / "metrics.json").read_text())["generation"]["n_prompts"] == 4

    # Win rates are what the stored scores say, and the scores are the judge's.
    judged = result["judge"]
    for key, other in (("vs_reference", "reference"), ("vs_chosen", "chosen")):
        expected = count_wins([r["scores"]["policy"] for r in rows], [r["scores"][other] for r in rows])
        assert judged[key] == expected
        assert judged[key]["ci95"][0] <= judged[key]["win_rate"] <= judged[key]["ci95"][1]
    judge = RewardJudge(str(judge_dir))
    assert judge.score(rows[0]["prompt"], rows[0]["chosen"]) == pytest.approx(rows[0]["scores"]["chosen"], abs=1e-5)
    assert run.summary()["win_rate"]["win_rate"] == judged["vs_reference"]["win_rate"]

    # Seeded sampling: generating again gives the same answers.
    from dpolab.config import TrainConfig
    from dpolab.evaluate.generation import generate_answers
    from dpolab.evaluate.pairs import held_out_pairs
    from dpolab.model import load_frozen, load_tokenizer

    config = TrainConfig.from_dict(run.config())
    tokenizer = load_tokenizer(config.model)
    rerun = generate_answers(load_frozen(str(run.model_dir), "cpu"), load_frozen(config.model, "cpu"), tokenizer,
                             held_out_pairs(config, tokenizer)[0], n_prompts=2, seed=7, max_new_tokens=8)
    assert [(r["policy"], r["reference"]) for r in rerun] == [(r["policy"], r["reference"]) for r in rows[:2]]


def test_judge_that_is_not_a_model_is_a_one_line_error(tmp_path):
    from dpolab.errors import ConfigError
    from dpolab.evaluate.generation import RewardJudge

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a loadable reward model"):
        RewardJudge(str(tmp_path / "empty"))


@pytest.mark.slow
def test_training_and_evaluate_give_the_same_length_metrics(tiny_run, tmp_path, monkeypatch, capsys):
    """One function computes the length-controlled metrics: the final evaluation of training (fp32)
    and `dpolab evaluate` of the saved model agree on every one of them."""
    from dpolab.cli import main

    shutil.copytree(tiny_run.path, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "run", "--n-prompts", "0"]) == 0
    printed = capsys.readouterr().out
    pairs = json.loads((tmp_path / "run" / "evaluation" / "metrics.json").read_text())["pairs"]
    final = RunFolder.open(tmp_path / "run").summary()["eval"]
    keys = sorted(k for k in final if k.startswith(("length/", "rewards/accuracies_")))
    assert {"length/chosen_longer", "length/chosen_tokens", "length/margin_spearman",
            "rewards/accuracies_length_balanced_ci_high", "rewards/accuracies_length_residual",
            "length/pairs_similar_length"} <= set(keys)
    assert keys == sorted(k for k in pairs if k.startswith(("length/", "rewards/accuracies_")))
    for key in keys:
        assert pairs[key] == pytest.approx(final[key], abs=1e-5), key
    assert f"length-only baseline {final['length/chosen_longer']:.3f}" in printed

    # The final evaluation's per-pair record: its means are the logged means.
    rows = RunFolder.open(tmp_path / "run").eval_pairs()
    assert len(rows) == pairs["pairs"] == tiny_run.summary()["eval_pairs"]
    assert sum(r["margin"] for r in rows) / len(rows) == pytest.approx(final["rewards/margins"], abs=1e-6)
    assert sum(r["chosen_tokens"] for r in rows) / len(rows) == pytest.approx(final["length/chosen_tokens"])
