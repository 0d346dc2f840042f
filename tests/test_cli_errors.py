"""Bad models, output folders and storages: one line naming what is wrong, exit code 2, no
traceback, and no password in sweep.json."""

from __future__ import annotations

import json
import shutil

import pytest

from dpolab.cli import main
from dpolab.sweep.study import redact

TRAIN = ["train", "--config", "configs/tiny.yaml", "--max-steps", "1"]


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("model", "message"), [
    ("does-not-exist", "no such local folder, not a built-in (tiny-gpt2, gpt2-124m-random), and not in the Hub cache"),
    ("runs/none/model", "and not a valid Hub id"),
])
def test_a_model_that_does_not_exist_is_one_line(tmp_path, capsys, model, message):
    err = one_line_error(capsys, [*TRAIN, "--model", model, "--output-dir", str(tmp_path / "run")])
    assert message in err
    assert not (tmp_path / "run").exists()  # nothing made before the check


def test_a_hub_id_with_the_network_unreachable_fails_at_once(tmp_path, capsys, monkeypatch):
    """`--model 123` asks the Hub once (no retries) and says why it cannot load."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    err = one_line_error(capsys, [*TRAIN, "--model", "123", "--output-dir", str(tmp_path / "run")])
    assert "model '123': no such local folder" in err
    assert "the Hub is unreachable" in err or "not a model on the Hub" in err  # no network here / with one


def test_corrupt_and_truncated_model_folders_are_one_line(tmp_path, capsys, tiny_run):
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    err = one_line_error(capsys, [*TRAIN, "--model", str(no_config), "--output-dir", str(tmp_path / "a")])
    assert f"{no_config} is not a Hugging Face model folder (no config.json)" in err

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_run.model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = one_line_error(capsys, [*TRAIN, "--model", str(truncated), "--output-dir", str(tmp_path / "b")])
    assert f"model {truncated}: cannot load it" in err

    torn = tmp_path / "torn"
    shutil.copytree(tiny_run.model_dir, torn)
    (torn / "config.json").write_text('{"model_type": "gpt2", ')
    err = one_line_error(capsys, [*TRAIN, "--model", str(torn), "--output-dir", str(tmp_path / "c")])
    assert f"model {torn}: cannot load" in err


def test_output_dir_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    err = one_line_error(capsys, [*TRAIN, "--output-dir", str(a_file)])
    assert f"{a_file}: exists and is not a folder" in err
    # /sys is read-only even for root: an output and a cache folder that cannot be written.
    err = one_line_error(capsys, [*TRAIN, "--output-dir", "/sys/dpolab-run"])
    assert "/sys/dpolab-run" in err and "not permitted" in err
    err = one_line_error(capsys, [*TRAIN, "--cache-dir", "/sys/dpolab-cache", "--output-dir", str(tmp_path / "r")])
    assert "/sys/dpolab-cache" in err


@pytest.mark.parametrize(("storage", "message"), [
    ("postgresql+psycopg2://dpolab:pw@127.0.0.1:9/x", "cannot use it (OperationalError"),  # nothing listens on port 9
    ("postgresql+pg8000://dpolab:pw@127.0.0.1:9/x", "its database driver is not installed"),
])
def test_unusable_storage_is_one_line_without_the_password(tmp_path, capsys, storage, message):
    err = one_line_error(capsys, ["sweep", "--output-dir", str(tmp_path / "sweep"), "--storage", storage])
    assert message in err and "pw" not in err
    assert not (tmp_path / "sweep").exists()


def test_storage_password_in_the_query_is_redacted_in_sweep_json(tmp_path):
    from dpolab.sweep.config import SweepConfig
    from dpolab.sweep.runner import prepare_sweep

    url = f"sqlite:///{tmp_path / 'study.db'}?password=hunter2&timeout=5"
    sweep = prepare_sweep(SweepConfig(), tmp_path / "sweep", url, warm_caches=False)
    text = json.dumps(sweep.info())
    assert "hunter2" not in text and "password=***" in text
    assert redact("postgresql://me:secret@db:5432/x?sslpassword=s2") == "postgresql://me:***@db:5432/x?sslpassword=***"


# ---- contradictions and out-of-range options: one line naming the option, before any work --------

@pytest.mark.parametrize(("argv", "message"), [
    ([*TRAIN, "--max-steps", "0"], "max_steps must be > 0, or -1 to train num_train_epochs, got 0"),
    ([*TRAIN, "--engine", "trl", "--batch-layout", "packed"], "batch_layout 'packed' runs on engine 'dpolab' only"),
    (["sft", "--stage", "dpo", "--max-steps", "1"], "--stage dpo: `dpolab sft` trains stage 'sft'"),
    (["sft", "--loss-type", "ipo", "--max-steps", "1"], "--loss-type: a DPO option that SFT does not use"),
    (["sft", "--beta", "0.5", "--max-steps", "1"], "--beta: a DPO option that SFT does not use"),
    (["sft", "--ref-model", "tiny-gpt2", "--max-steps", "1"], "--ref-model: a DPO option that SFT does not use"),
])
def test_contradicting_training_options_are_refused(tmp_path, capsys, argv, message):
    err = one_line_error(capsys, [*argv, "--output-dir", str(tmp_path / "run")])
    assert message in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--reference", "tiny-gpt2"], "--reference goes with --dataset SOURCE"),
    (["--columns", "prompt=q"], "--columns goes with --dataset SOURCE"),
    (["--top-p", "5"], "--top-p must be in (0, 1], got 5.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--temperature", "-1"], "--temperature must be > 0 (answers are sampled), got -1.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
])
def test_evaluate_options_out_of_range_or_without_dataset_are_refused(tiny_run, tmp_path, capsys, options, message):
    err = one_line_error(capsys, ["evaluate", str(tiny_run.path), *options, "--output-dir", str(tmp_path / "ev")])
    assert message in err
    assert not (tmp_path / "ev").exists()


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, capsys):
    err = one_line_error(capsys, [*TRAIN, "--output-dir", str(tmp_path / "typo"), "--resume"])
    assert f"--resume: {tmp_path / 'typo'} holds no run to resume" in err
    assert not (tmp_path / "typo").exists()  # nothing started from scratch


def test_a_device_torch_cannot_use_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only torch
    err = one_line_error(capsys, [*TRAIN, "--device", "cuda", "--output-dir", str(tmp_path / "run")])
    assert "device 'cuda': torch" in err and "use --device cpu or auto" in err


def test_an_error_without_a_message_still_gives_one_line(monkeypatch):
    """Libraries raise exceptions with empty messages; quoting their 'first line' must not fail."""
    import transformers

    from dpolab.errors import ConfigError, first_line
    from dpolab.evaluate.generation import RewardJudge

    def raise_bare(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", raise_bare)
    with pytest.raises(ConfigError, match=r"^--judge judge-dir: not a loadable reward model \(OSError\)$"):
        RewardJudge("judge-dir")
    assert first_line(ValueError("\n  \n  second line\nthird")) == "second line"
    assert first_line(ValueError(""), with_type=True) == "ValueError"
    assert first_line(KeyError("k"), with_type=True) == "KeyError: 'k'"
