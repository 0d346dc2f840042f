"""The card says what the run was, from its records: stage, data, base, reference, template,
precision and architecture, never fixed GPT-2 / HH-RLHF / DPO text. Runs are trained through the
CLI (one step each) and exported as a user would."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from dpolab.cli import main
from dpolab.hub.push import _commit_message
from dpolab.runs import RunFolder
from tests.chat_model import build_chat_model
from tests.data.test_formats import as_format, real_pairs, write_jsonl

TINY = ["--max-steps", "1", "--max-train-pairs", "8", "--max-eval-pairs", "4", "--max-length", "128",
        "--max-prompt-length", "64", "--per-device-train-batch-size", "2"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return tmp_path_factory.mktemp("card-runs")


def trained_and_exported(lab, name: str, command: list[str], *export_options: str) -> tuple[RunFolder, ModelCard]:
    assert main([*command, *TINY, "--output-dir", str(lab / "runs" / name)]) == 0
    out = lab / "exports" / name
    assert main(["export", str(lab / "runs" / name), str(out), *export_options]) == 0
    return RunFolder.open(lab / "runs" / name), ModelCard.load(out / "README.md")


@pytest.fixture(scope="module")
def sft(lab):
    return trained_and_exported(lab, "sft", ["sft", "--model", "tiny-gpt2", "--dtype", "fp32"])


@pytest.fixture(scope="module")
def user_data(lab):
    data = write_jsonl(lab / "prefs.jsonl", [as_format(p, "explicit") for p in real_pairs(16)])
    return trained_and_exported(lab, "user", ["train", "--model", "tiny-gpt2", "--dataset", data, "--dtype", "bf16"])


@pytest.fixture(scope="module")
def chat(lab):
    """A Qwen2 chat model trained (LoRA) against another chat model given as --ref-model."""
    policy, reference = build_chat_model(lab / "qwen-policy"), build_chat_model(lab / "qwen-reference", seed=1)
    command = ["train", "--model", str(policy), "--ref-model", str(reference), "--lora-r", "4", "--dtype", "fp32"]
    run, card = trained_and_exported(lab, "chat", command)
    out = lab / "exports" / "chat-adapter"
    assert main(["export", str(run.path), str(out), "--adapter-only"]) == 0
    return run, card, ModelCard.load(out / "README.md")


def test_an_sft_card_says_sft_and_names_its_loss_as_the_answer_nll(sft):
    run, card = sft
    assert "DPO" not in card.content and "dpo" not in card.data.tags and "sft" in card.data.tags
    nll = run.summary()["eval"]["loss"]
    assert f"| held-out answer NLL (nats per token) | {nll:.4f} |" in card.text
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        ("Held-out answer NLL (nats per token)", nll)]
    assert "Reference model" not in card.text and "dpolab_reference_model" not in card.content  # SFT has none
    assert "| beta |" not in card.text and "Reward accuracy" not in card.text
    assert card.data.dpolab_dtype == "fp32" and "trained in **fp32**" in card.text
    assert _commit_message(card.data.to_dict()) == f"Upload SFT model sft (eval loss {nll:.4f}) with dpolab"


def test_a_user_dataset_card_claims_no_hh_rlhf_licence_or_local_path(user_data, lab):
    run, card = user_data
    assert "HH-RLHF" not in card.content and "hh-rlhf" not in card.content
    assert card.data.license is None and card.data.datasets is None and card.data.language is None
    metadata = card.content.split("\n---\n")[0]
    assert "model-index" not in metadata and str(lab) not in metadata  # no local path for the Hub to read
    report = run.data_report()
    assert f"Data: `{lab / 'prefs.jsonl'}`, the user's own local data (not on the Hub)." in card.text
    assert f"| pairs kept (train) | {report['kept']['train']} |" in card.text
    # The precision the run trained in, from its record (config.yaml says what was asked).
    assert run.resolved()["dtype"] == "bf16"
    assert card.data.dpolab_dtype == "bf16" and "trained in **bf16**" in card.text and "| dtype | bf16 |" in card.text
    assert _commit_message(card.data.to_dict()) == "Upload DPO model user with dpolab"


def test_a_chat_model_card_names_its_architecture_template_and_ref_model(chat, lab):
    run, card, _ = chat
    reference = str(lab / "qwen-reference")
    assert "gpt2" not in card.data.tags and "qwen2" in card.data.tags and "GPT-2" not in card.text
    assert "`qwen2` (`Qwen2ForCausalLM`)" in card.text
    template = run.resolved()["chat_template"]
    assert template["name"] == "tokenizer" and template["sha256"]
    assert f"the base model's own chat template (sha256 `{template['sha256']}`)" in card.text
    assert "apply_chat_template" in card.text and "Human: {your message}" not in card.text
    # The reference is the --ref-model, not the starting model.
    assert run.reference_model() == reference == card.data.dpolab_reference_model
    assert f"- Reference model (the frozen model the DPO rewards are measured against): `{reference}`" in card.text
    assert f"with `{reference}` (`ref_model`) as the reference" in card.text
    # A local base has no Hub id and no licence the records know; the data is HH-RLHF.
    assert card.data.base_model is None and card.data.license is None
    assert card.data.datasets == ["Anthropic/hh-rlhf"]


def test_an_adapter_only_card_names_a_base_off_the_hub_without_a_snippet_that_cannot_load(chat, lab):
    run, _, card = chat
    base = str(lab / "qwen-policy")
    assert "lora" in card.data.tags and card.data.library_name == "peft"
    assert (f"it applies to the base model `{base}` (the base named in `adapter_config.json`), a local model "
            "folder that is **not on the Hub**") in card.text
    assert "from_pretrained(" not in card.text and 'pipeline("text-generation"' not in card.text
