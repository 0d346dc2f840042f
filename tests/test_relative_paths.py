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


def test_mix_members_and_template_are_recorded_absolute_and_evaluate_runs_from_root(tmp_path, monkeypatch):
    """Every path inside a mix (and a .jinja template) is made absolute at the command line, like a
    single path: the records mean the same from `/`, where the relative strings would send
    `evaluate` to the Hub."""
    from tests.data.test_formats import as_format, real_pairs, write_jsonl

    lab = tmp_path / "lab"
    (lab / "data").mkdir(parents=True)
    pairs = real_pairs(24)
    write_jsonl(lab / "data" / "explicit.jsonl", [as_format(p, "explicit") for p in pairs[:12]])
    write_jsonl(lab / "data" / "conv.jsonl", [as_format(p, "conversational") for p in pairs[12:]])
    (lab / "chat.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}[assistant] {% endif %}")
    monkeypatch.chdir(lab)
    assert main(["train", "--model", "tiny-gpt2", "--dataset", "data/explicit.jsonl:0.7,data/conv.jsonl:0.3",
                 "--chat-template", "chat.jinja", "--max-steps", "1", "--per-device-train-batch-size", "2",
                 "--max-length", "128", "--max-prompt-length", "64", "--dtype", "fp32",
                 "--output-dir", "runs/mix"]) == 0

    run = RunFolder.open(lab / "runs" / "mix")
    mix = f"{lab}/data/explicit.jsonl:0.7,{lab}/data/conv.jsonl:0.3"
    assert run.config()["dataset"] == mix and run.info()["dataset"] == mix
    assert run.config()["chat_template"] == str(lab / "chat.jinja")
    assert [s["source"] for s in run.data_report()["sources"]] == [f"{lab}/data/explicit.jsonl",
                                                                   f"{lab}/data/conv.jsonl"]

    monkeypatch.chdir("/")
    assert main(["evaluate", str(run.path), "--n-prompts", "1", "--max-new-tokens", "2"]) == 0
    assert json.loads((run.path / "evaluation" / "metrics.json").read_text())["pairs"]["pairs"] > 0


def test_a_mistyped_file_inside_a_mix_fails_in_one_line_before_anything_is_made(tmp_path, monkeypatch, capsys):
    """A missing local file in a mix is named as such, not looked up on the Hub (whose retries cost
    tens of seconds), and no run folder is made."""
    (tmp_path / "data").mkdir()
    shutil.copyfile(sample_path(), tmp_path / "data" / "pairs.jsonl.gz")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "tiny-gpt2", "--dataset", "data/pairs.jsonl.gz:0.5,data/pars.jsonl:0.5",
                 "--max-steps", "1", "--output-dir", "runs/typo"]) == 2
    err = capsys.readouterr().err
    assert err == "dpolab train: error: dataset: 'data/pars.jsonl': no such file or folder\n"
    assert not (tmp_path / "runs").exists()
