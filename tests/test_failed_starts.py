"""A run whose start fails (bad data, a model that cannot load, a device torch lacks) leaves no
half-made run folder behind, `dpolab report` refuses one, and the saved model is as readable as
every other record of the run."""

from __future__ import annotations

import json
import stat

from dpolab.cli import main
from dpolab.runs import RunFolder, default_file_mode

TINY = ["--max-train-pairs", "8", "--max-eval-pairs", "4", "--max-steps", "1", "--max-length", "128",
        "--max-prompt-length", "64", "--dtype", "fp32"]


def test_a_failed_start_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"  # parses, but every pair's answers are the same: nothing to train on
    bad.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "same", "rejected": "same"}) + "\n"
                           for i in range(6)))
    assert main(["train", "--dataset", str(bad), "--output-dir", "runs/new", *TINY]) == 2
    assert not (tmp_path / "runs/new").exists()

    # A folder the user made beforehand stays, without the records the failed start wrote.
    (tmp_path / "runs/mine").mkdir(parents=True)
    (tmp_path / "runs/mine/notes.txt").write_text("mine")
    assert main(["sft", "--dataset", str(bad), "--output-dir", "runs/mine", *TINY]) == 2
    assert sorted(p.name for p in (tmp_path / "runs/mine").iterdir()) == ["notes.txt"]
    capsys.readouterr()


def test_report_refuses_a_run_that_never_trained(tmp_path, capsys):
    RunFolder.create(tmp_path / "half", {"engine": "dpolab"})  # what a start killed during setup leaves
    assert main(["report", str(tmp_path / "half")]) == 2
    assert "nothing to report: the run has logged no training step yet" in capsys.readouterr().err


def test_saved_weights_have_the_mode_of_every_other_record(tiny_run):
    expected = default_file_mode()
    for path in (tiny_run.model_dir / "model.safetensors", tiny_run.model_dir / "config.json", tiny_run.summary_path):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path  # safetensors alone would write 0600
