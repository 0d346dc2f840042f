"""Data a user brings, through the real CLI: unusable pairs are counted (or stop the run in one
line), a column mapping that names nothing fails, CSV reads like JSON Lines, and `dpolab data check`
reports the data as training would prepare it, without loading a model."""

from __future__ import annotations

import csv
import json

import pytest

from dpolab.cli import main
from dpolab.runs import RunFolder

PROMPT = "\n\nHuman: what is {i} plus one?\n\nAssistant:"
FAST = ["--max-steps", "1", "--max-train-pairs", "8", "--max-eval-pairs", "4", "--dtype", "fp32",
        "--max-length", "64", "--max-prompt-length", "32"]


def rows(n: int, identical: int = 0, empty: int = 0) -> list[dict[str, str]]:
    """``n`` explicit pairs: the first ``identical`` with the same answer twice (up to spaces), the
    next ``empty`` with an empty chosen answer."""
    out = []
    for i in range(n):
        chosen, rejected = f" {i + 1}.", f" {i + 2}, I think."
        if i < identical:
            rejected = chosen + " "
        elif i < identical + empty:
            chosen = ""
        out.append({"prompt": PROMPT.format(i=i), "chosen": chosen, "rejected": rejected})
    return out


def write_jsonl(path, data) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path.name


def write_csv(path, data) -> str:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(data)
    return path.name


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with its own data cache, files named relative to it as a user would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path


# ---- pairs whose two answers are the same ---------------------------------------------------------

def test_identical_answers_are_dropped_and_counted_by_train_and_evaluate(workdir, capsys):
    data = write_jsonl(workdir / "mixed.jsonl", rows(24, identical=6))
    assert main(["train", "--dataset", data, *FAST, "--output-dir", "runs/mixed"]) == 0
    report = RunFolder.open(workdir / "runs" / "mixed").data_report()
    assert report["dropped"] == {"identical_answers": 6}
    assert report["rows_read"] == 24

    assert main(["evaluate", "tiny-gpt2", "--reference", "tiny-gpt2", "--dataset", data, "--output-dir", "ev"]) == 0
    metrics = json.loads((workdir / "ev" / "metrics.json").read_text())
    assert metrics["data_report"]["dropped"] == {"identical_answers": 6}
    assert metrics["pairs"]["pairs"] == 18
    capsys.readouterr()


def test_a_data_set_with_no_usable_pair_stops_in_one_line(workdir, capsys):
    data = write_jsonl(workdir / "zero_valid.jsonl", rows(20, identical=20))
    for argv in (["train", "--dataset", data, *FAST, "--output-dir", "runs/zero"],
                 ["evaluate", "tiny-gpt2", "--reference", "tiny-gpt2", "--dataset", data, "--output-dir", "ev"],
                 ["data", "check", "--dataset", data]):
        err = one_line_error(capsys, argv)
        assert "zero_valid.jsonl: no usable pairs" in err and "identical_answers=20" in err, err


# ---- --columns ------------------------------------------------------------------------------------

def test_columns_naming_a_missing_column_names_it_and_the_columns_found(workdir, capsys):
    data = write_jsonl(workdir / "pairs.jsonl", rows(12))
    mapping = "prompt=nosuchcol,chosen=chosen,rejected=rejected"
    for argv in (["train", "--dataset", data, "--columns", mapping, *FAST, "--output-dir", "runs/cols"],
                 ["data", "check", "--dataset", data, "--columns", mapping]):
        err = one_line_error(capsys, argv)
        assert "pairs.jsonl: columns: prompt=nosuchcol names no column of the data" in err
        assert "(columns found: chosen, prompt, rejected)" in err


# ---- CSV reads like JSON Lines --------------------------------------------------------------------

def test_csv_and_jsonl_give_the_same_report(workdir, capsys):
    """An empty CSV cell is an empty answer (dropped, counted) as JSON's "" is; 'None' is a word."""
    data = rows(16, empty=2)
    data[-1]["rejected"] = "None"  # a word: pandas' CSV reader would make it a missing value
    reports = {}
    for name, path in (("jsonl", write_jsonl(workdir / "pairs.jsonl", data)),
                       ("csv", write_csv(workdir / "pairs.csv", data))):
        assert main(["data", "check", "--dataset", path]) == 0, capsys.readouterr().err
        reports[name] = capsys.readouterr().out
    for name, out in reports.items():
        assert "dropped    empty_answer=2\n" in out, (name, out)
        assert "kept       train=13, eval=1\n" in out, (name, out)  # the 'None' pair is kept


def test_header_only_csv_is_one_line_naming_the_file(workdir, capsys):
    (workdir / "header.csv").write_text("prompt,chosen,rejected\n")
    err = one_line_error(capsys, ["data", "check", "--dataset", "header.csv"])
    assert "header.csv: no rows, only the header (prompt, chosen, rejected)" in err


# ---- dpolab data check ----------------------------------------------------------------------------

def test_data_check_prepares_what_training_uses_without_loading_a_model(workdir, capsys, caplog, monkeypatch):
    import dpolab.model

    data = write_jsonl(workdir / "pairs.jsonl", rows(30, identical=3, empty=1))
    options = ["--dataset", data, "--max-length", "64", "--max-prompt-length", "32", "--seed", "5"]

    def no_weights(*args, **kwargs):
        raise AssertionError("data check loaded model weights")

    with monkeypatch.context() as patch:
        patch.setattr(dpolab.model, "load_model", no_weights)
        assert main(["data", "check", *options]) == 0
    out = capsys.readouterr().out
    assert "rows read  30\n" in out
    assert "kept       train=23, eval=3\n" in out
    assert "dropped    empty_answer=1, identical_answers=3\n" in out

    # Same code path and config: the training run with the same options finds the data prepared.
    caplog.clear()
    with caplog.at_level("INFO", logger="dpolab.data.pipeline"):
        assert main(["train", *options, "--max-steps", "1", "--dtype", "fp32", "--output-dir", "runs/checked"]) == 0
    assert "data: cache hit" in caplog.text
    capsys.readouterr()


def test_data_check_refuses_a_bad_config_in_one_line(workdir, capsys):
    err = one_line_error(capsys, ["data", "check", "--max-prompt-length", "600"])
    assert "max_prompt_length (600) must be smaller than max_length (512)" in err
