"""The model card: parses with ModelCard.load and says what the run records say."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from dpolab.hub.card import build_card, card_data, is_hub_model_id, summary_win_rate
from dpolab.runs import resolve_run


def test_card_metadata_matches_the_run_records(sweep_export, hub_sweep):
    """base_model, datasets and eval results equal the best trial's records."""
    run = resolve_run(hub_sweep.path)
    info, summary = run.info(), run.summary()
    card = ModelCard.load(sweep_export.out_dir / "README.md")
    data = card.data

    # tiny-gpt2 is a built-in (random init, not on the Hub): no Hub base_model link, the record verbatim.
    assert info["base_model"] == "tiny-gpt2"
    assert data.base_model is None
    assert data.dpolab_base_model == info["base_model"]
    assert info["dataset"] == "hh-rlhf-sample" and data.datasets == ["Anthropic/hh-rlhf"]
    assert {"dpo", "gpt2", "rlhf", "dpolab"} <= set(data.tags)
    assert data.pipeline_tag == "text-generation" and data.license == "mit"

    got = {r.metric_type: r.metric_value for r in data.eval_results}
    assert got == {"loss": summary["eval"]["loss"], "accuracy": summary["eval"]["rewards/accuracies"],
                   "reward_margin": summary["eval"]["rewards/margins"], "win_rate": 0.7,
                   "accuracy_length_balanced": summary["eval"]["rewards/accuracies_length_balanced"],
                   "accuracy_length_baseline": summary["eval"]["length/chosen_longer"]}
    assert {r.dataset_type for r in data.eval_results} == {"Anthropic/hh-rlhf"}
    assert data.model_name == "trial-001"


def test_card_body_describes_training(sweep_export, hub_sweep):
    run = resolve_run(hub_sweep.path)
    body = ModelCard.load(sweep_export.out_dir / "README.md").text
    config, report = run.config(), run.data_report()
    assert "\\n\\nHuman: {your message}\\n\\nAssistant:" in body
    assert f"loss type `{config['loss_type']}` and beta = {config['beta']}" in body
    assert f"| pairs kept (train) | {report['kept']['train']} |" in body
    assert f"| pairs dropped (prompt mismatch) | {report['dropped']['prompt_mismatch']} |" in body
    assert f"| learning rate | {config['learning_rate']:.4g} |" in body
    for section in ("## Sweep", "## Plots", "## Usage", "## Intended use and limitations", "## Citation",
                    "### Length-controlled evaluation", "Length-controlled, on the same held-out pairs:"):
        assert section in body
    evaluation = run.summary()["eval"]
    assert (f"| length-only baseline (longer answer preferred) | {evaluation['length/chosen_longer']:.3f} "
            f"[{evaluation['length/chosen_longer_ci_low']:.2f}, {evaluation['length/chosen_longer_ci_high']:.2f}] |") in body
    assert 'pipeline("text-generation"' in body and "dpolab serve" in body
    assert "arXiv:2204.05862" in body and "2305.18290" in body
    assert "can produce harmful" in body


def test_hub_base_model_and_missing_win_rate(tmp_path):
    from tests.hub.factory import EVALS, make_run

    run = make_run(tmp_path / "gpt2-run", EVALS["trial-000"], base_model="gpt2", with_model=False)
    data = card_data(run)
    assert data.base_model == "gpt2" and data.dpolab_base_model == "gpt2"
    assert "win_rate" not in {r.metric_type for r in data.eval_results}
    card = build_card(run, repo_id="alice/dpo-gpt2")
    assert "No generation win rate was measured" in card.text
    assert 'model="alice/dpo-gpt2"' in card.text and "dpolab serve alice/dpo-gpt2" in card.text
    assert ModelCard(card.content).data.base_model == "gpt2"  # round-trips through YAML


@pytest.mark.parametrize(("name", "expected"), [
    ("gpt2", True), ("openai-community/gpt2", True), ("tiny-gpt2", False), ("gpt2-124m-random", False),
    (".", False), ("not a/valid id", False)])
def test_is_hub_model_id(name, expected):
    assert is_hub_model_id(name) is expected


def test_summary_win_rate_reads_what_evaluate_writes(tmp_path):
    from tests.hub.factory import EVALS, make_run

    judged = make_run(tmp_path / "judged", EVALS["trial-001"], judged=True, with_model=False).summary()
    assert judged["win_rate"]["vs"] == "reference" and judged["win_rate"]["n"] == 5
    assert summary_win_rate(judged) == 0.7  # 3 wins and 1 tie in 5
    assert summary_win_rate(make_run(tmp_path / "plain", EVALS["trial-001"], with_model=False).summary()) is None


@pytest.mark.parametrize(("dataset", "datasets", "index_type"), [
    ("org/stack", ["org/stack"], "org/stack"),  # a Hub data set: named and indexed by its id
    ("/data/prefs.jsonl:0.5,org/stack:0.5", ["org/stack"], None),  # a mix has no one id to index
    ("/data/prefs.jsonl", None, None),  # local data: nothing for the Hub to link
    ("hh-rlhf-sample:0.5,Anthropic/hh-rlhf:0.5", ["Anthropic/hh-rlhf"], "Anthropic/hh-rlhf")])
def test_card_metadata_names_only_hub_datasets(tmp_path, dataset, datasets, index_type):
    from tests.hub.factory import EVALS, make_run

    run = make_run(tmp_path / "run", EVALS["trial-000"], with_model=False)
    run.update_info(dataset=dataset)
    data = card_data(run)
    assert data.datasets == datasets
    assert ([r.dataset_type for r in data.eval_results or []][:1] or [None]) == [index_type]
    assert (data.license == "mit") is (index_type == "Anthropic/hh-rlhf")  # HH-RLHF on a built-in base only
