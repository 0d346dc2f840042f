"""The CLI run from a working directory with relative paths. Paths are resolved once at
the command-line edge, so a run trained with `--dataset data/pairs.jsonl.gz` in one folder is
evaluated, reported, exported and (dry-run) pushed from another, all with relative paths."""

from __future__ import annotations

import json
import shutil

from dpolab.cli import main
from dpolab.data import sample_path
from dpolab.runs import RunFolder


def test_cli_with_relative_paths_from_two_working_directories(tmp_path, monkeypatch, capsys):
    lab, elsewhere = tmp_path / "lab", tmp_path / "elsewhere"
    (lab / "data").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copyfile(sample_path(), lab / "data" / "pairs.jsonl.gz")
    (lab / "tiny.yaml").write_text("model: tiny-gpt2\nmax_train_pairs: 16\nmax_eval_pairs: 8\nmax_steps: 2\n"
                                   "per_device_train_batch_size: 4\nmax_length: 128\nmax_prompt_length: 64\n")

    monkeypatch.chdir(lab)
    assert main(["train", "--config", "tiny.yaml", "--dataset", "data/pairs.jsonl.gz", "--cache-dir", "cache",
                 "--output-dir", "runs/rel"]) == 0
    run = RunFolder.open(lab / "runs" / "rel")
    assert run.config()["dataset"] == str(lab / "data" / "pairs.jsonl.gz")  # recorded absolute
    assert run.config()["cache_dir"] == str(lab / "cache")

    # From another folder: the run's relative dataset path would point nowhere.
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "../lab/runs/rel", "--n-prompts", "1", "--max-new-tokens", "4"]) == 0
    assert json.loads((run.path / "evaluation" / "metrics.json").read_text())["pairs"]["pairs"] == 8

    monkeypatch.chdir(lab)
    assert main(["report", "runs/rel", "--output-dir", "out/report"]) == 0
    assert (lab / "out" / "report" / "report.html").is_file()
    assert main(["export", "runs/rel", "exports/rel"]) == 0
    assert (lab / "exports" / "rel" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["push", "exports/rel", "--repo-id", "me/tiny-dpo", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "model.safetensors" in plan and "me/tiny-dpo" in plan
