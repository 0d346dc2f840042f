"""`dpolab export`: a standard HF folder that generates, reproducibly, from the sweep's best trial."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from dpolab.errors import DpolabError, RunFolderError
from dpolab.hub.export import export, is_export
from dpolab.runs import RunFolder

EXPECTED_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "plots/loss.png", "plots/rewards.png", "plots/table.md"}


def test_export_writes_the_hf_layout_and_generates(sweep_export):
    """The export loads in a transformers pipeline and generates text."""
    from transformers import pipeline

    assert set(sweep_export.files) == EXPECTED_FILES
    assert is_export(sweep_export.out_dir)
    generator = pipeline("text-generation", model=str(sweep_export.out_dir))
    prompt = "\n\nHuman: How do I make a cup of tea?\n\nAssistant:"
    # The stop documented in the card must work with the exported files as they are.
    out = generator(prompt, max_new_tokens=12, stop_sequence="\n\nHuman:", return_full_text=False)
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"]
    plain = generator(prompt, max_new_tokens=5)  # generation_config.json alone must not break generate()
    assert plain[0]["generated_text"].startswith(prompt)


def test_second_export_is_byte_identical(sweep_export, hub_sweep, tmp_path):
    """Same input -> same bytes, file by file."""
    again = export(hub_sweep.path, tmp_path / "again")
    assert again.files == sweep_export.files
    for rel in sweep_export.files:
        assert (again.out_dir / rel).read_bytes() == (sweep_export.out_dir / rel).read_bytes(), rel


def test_export_is_the_best_trial_not_another(sweep_export, hub_sweep):
    from safetensors.torch import load_file

    exported = load_file(sweep_export.out_dir / "model.safetensors")
    best = load_file(RunFolder(hub_sweep.path / "trials/trial-001").model_dir / "model.safetensors")
    other = load_file(RunFolder(hub_sweep.path / "trials/trial-000").model_dir / "model.safetensors")
    assert exported.keys() == best.keys()
    assert all(torch.equal(exported[k], best[k]) for k in best)
    assert not all(torch.equal(exported[k], other[k]) for k in other)


def test_safetensors_header_has_no_volatile_metadata(sweep_export):
    raw = (sweep_export.out_dir / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    assert header["__metadata__"] == {"format": "pt"}


def test_generation_config_is_set_for_gpt2(sweep_export):
    config = json.loads((sweep_export.out_dir / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["pad_token_id"] == 50256
    assert config["do_sample"] is True and 0 < config["temperature"] < 1 and 0 < config["top_p"] < 1
    # A saved stop string makes generate() without a tokenizer raise; the card documents it instead.
    assert "stop_strings" not in config


def test_plots_and_table_are_copied_and_linked(sweep_export, hub_sweep):
    for name in ("loss.png", "rewards.png", "table.md"):
        assert (sweep_export.out_dir / "plots" / name).read_bytes() == (hub_sweep.report_dir / name).read_bytes()
    card = (sweep_export.out_dir / "README.md").read_text()
    assert "![loss](plots/loss.png)" in card and "![rewards](plots/rewards.png)" in card
    # The sweep table: the one builder `dpolab report` uses too, from the trial records.
    from dpolab.report.collect import collect
    from dpolab.report.table import table_rows, to_markdown

    table = to_markdown(table_rows(collect(hub_sweep.path).trials)).strip()
    assert table in card
    assert "| **★ trial-001** |" in table and "0.6543" in table and "0.6812" in table


def test_export_replaces_an_earlier_export_but_nothing_else(hub_run, tmp_path):
    out = tmp_path / "out"
    export(hub_run.path, out)
    (out / "stale.txt").write_text("left from an older export")
    result = export(hub_run.path, out)
    assert not (out / "stale.txt").exists() and "plots/loss.png" not in result.files  # single run: no plots

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DpolabError, match="refusing to overwrite"):
        export(hub_run.path, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_export_of_unfinished_run_is_a_one_line_error(hub_run, tmp_path):
    from tests.hub.factory import EVALS, make_run

    run = make_run(tmp_path / "unfinished", EVALS["trial-000"], with_model=False)
    with pytest.raises(RunFolderError, match="no final model"):
        export(run.path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RunFolderError, match="not a dpolab run folder"):
        export(tmp_path, tmp_path / "out2")


@pytest.mark.slow  # trains the shared tiny_run (~30 s on 2 cores) unless another test already did
def test_export_of_a_trained_run(tiny_run, tmp_path):
    """End to end on a run the real trainer wrote: export, card values = its records, generate."""
    from huggingface_hub import ModelCard
    from transformers import pipeline

    result = export(tiny_run.path, tmp_path / "out")
    summary = tiny_run.summary()
    data = ModelCard.load(result.out_dir / "README.md").data
    got = {r.metric_type: r.metric_value for r in data.eval_results}
    assert got["loss"] == summary["eval"]["loss"]
    assert got["accuracy"] == summary["eval"]["rewards/accuracies"]
    assert got["reward_margin"] == summary["eval"]["rewards/margins"]
    assert data.dpolab_base_model == tiny_run.info()["base_model"]
    out = pipeline("text-generation", model=str(result.out_dir))("\n\nHuman: Hi\n\nAssistant:", max_new_tokens=4)
    assert out[0]["generated_text"].startswith("\n\nHuman: Hi\n\nAssistant:")
