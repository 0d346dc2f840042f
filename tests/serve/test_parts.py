"""Units behind the endpoints: stop strings while streaming, dialogue fitting, the experiments
page for a sweep, model resolution and the `serve` subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dpolab.errors import DpolabError, RunFolderError
from dpolab.serve.chat import TURN_STOPS, dialogue, fit_turns
from dpolab.serve.generation import AnswerSink


@pytest.fixture(scope="module")
def tokenizer():
    from dpolab.model import load_tokenizer

    return load_tokenizer("tiny-gpt2")


def test_sink_stops_at_next_human_turn_and_never_streams_it(tokenizer):
    pieces: list[str] = []
    sink = AnswerSink(tokenizer, TURN_STOPS, pieces.append)
    for token in tokenizer(" Sure, here it is.\n\nHuman: and now me\n\nAssistant: no").input_ids:
        sink.put_ids([token])
    sink.end()
    assert sink.stopped and sink.text == " Sure, here it is."
    assert "".join(pieces) == sink.text  # nothing of "\n\nHuman:" ever went out, even partially


def test_sink_holds_back_partial_characters_and_ends_at_eos(tokenizer):
    pieces: list[str] = []
    sink = AnswerSink(tokenizer, (), pieces.append)
    ids = tokenizer(" café 👍").input_ids + [tokenizer.eos_token_id] + tokenizer(" after").input_ids
    for token in ids:
        sink.put_ids([token])
    sink.end()
    assert "".join(pieces) == " café 👍" and all("\ufffd" not in p for p in pieces)
    assert sink.stopped and len(sink.ids) == len(ids) - len(tokenizer(" after").input_ids)


def test_sink_user_stop_string(tokenizer):
    sink = AnswerSink(tokenizer, ("END",), lambda _: None)
    sink.put_ids(tokenizer(" one two END three").input_ids)
    sink.end()
    assert sink.text == " one two " and sink.stopped


def test_dialogue_is_training_format():
    turns = [{"role": "user", "content": "Hi "}, {"role": "assistant", "content": " Hello"},
             {"role": "user", "content": "Bye"}]
    assert dialogue(turns) == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"


def test_fit_turns_drops_whole_exchanges_and_keeps_system_last():
    turns = [{"role": "system", "content": "sys"}, {"role": "user", "content": "a" * 50},
             {"role": "assistant", "content": "b" * 50}, {"role": "user", "content": "q"}]
    prompt, n_tokens, dropped = fit_turns(turns, len, budget=40, param="messages")
    assert dropped == 2 and prompt == "sys\n\nHuman: q\n\nAssistant:" and n_tokens == len(prompt)


def test_experiments_page_shows_sweep_table_and_plots(make_app, sweep_dir):
    from dpolab.serve.models import load_served_models

    client = make_app(MODELS=load_served_models(str(sweep_dir))).test_client()
    info = client.get("/api/model").json
    assert info["kind"] == "sweep" and info["sweep"]["trial"] == "trial-001" and info["beta"] == 0.2
    assert info["server"]["experiments"] is True
    html = client.get("/experiments").get_data(as_text=True)
    assert "<th>beta</th>" in html and "<td>0.05</td>" in html and "<td>0.2</td>" in html
    assert "★ trial-001" in html  # the report's table: best row marked
    # Plots from `dpolab report`, eval loss first; its table.png is not repeated under the HTML table.
    assert html.index("/experiments/report/eval_loss.png") < html.index("/experiments/report/loss.png")
    assert "table.png" not in html
    image = client.get("/experiments/report/loss.png")
    assert image.status_code == 200 and image.data.startswith(b"\x89PNG")
    report = client.get("/experiments/report.html")
    assert report.status_code == 200 and "<h1>Report</h1>" in report.get_data(as_text=True)
    assert "script-src" not in report.headers["Content-Security-Policy"]
    assert "default-src 'none'" in report.headers["Content-Security-Policy"]
    assert client.get("/experiments/report/../sweep.json").status_code == 404


def test_experiments_page_shows_each_trials_latest_samples(make_app, sweep_dir, tmp_path):
    """samples.jsonl (written at every evaluation while training) appears per trial: the latest
    evaluation's rows only, as text (a model's answer is never HTML)."""
    import shutil

    from dpolab.runs import RunFolder
    from dpolab.serve.models import load_served_models

    sweep = shutil.copytree(sweep_dir, tmp_path / "sweep")
    trial = RunFolder(sweep / "trials" / "trial-001")
    row = {"prompt": "\n\nHuman: hi\n\nAssistant:", "reference": "ref answer", "reward": 0.125}
    trial.append_samples([{**row, "step": 5, "policy": "old answer"}])
    trial.append_samples([{**row, "step": 10, "policy": "<b>new</b> answer"}])
    html = make_app(MODELS=load_served_models(str(sweep))).test_client().get("/experiments").get_data(as_text=True)
    assert "Samples (latest evaluation)" in html and "trial-001 (step 10)" in html
    assert "&lt;b&gt;new&lt;/b&gt; answer" in html and "<b>new</b>" not in html
    assert "old answer" not in html and "ref answer" in html and "0.125" in html
    assert "trial-000 (step" not in html  # a trial without samples gets no section


def test_describe_rejects_non_model_folders(tmp_path):
    from dpolab.serve.models import describe

    with pytest.raises(RunFolderError, match="not a dpolab run, sweep or model folder"):
        describe(str(tmp_path))


def test_default_model_is_latest_result_with_clear_message(tmp_path, run_dir):
    from dpolab.serve.models import default_source

    with pytest.raises(DpolabError, match="no MODEL given and no finished run or sweep"):
        default_source(tmp_path / "runs")
    assert Path(default_source(run_dir.parent)).parent == run_dir.parent


def test_serve_subcommand_parses_and_fails_in_one_line(tmp_path):
    from dpolab.serve.cli import register

    parser = argparse.ArgumentParser(prog="dpolab")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--port", "0", "--runs-dir", str(tmp_path), "--queue", "2"])
    assert args.model is None and args.host == "127.0.0.1" and args.queue == 2 and args.reference is None
    with pytest.raises(DpolabError, match="no MODEL given"):
        args.func(args)
    bad = parser.parse_args(["serve", str(tmp_path), "--port", "0"])
    with pytest.raises(RunFolderError):
        bad.func(bad)


def test_experiments_page_shows_the_length_controlled_table(make_app, sweep_dir, tmp_path):
    """A trial whose final evaluation has the length-controlled metrics gets a row in their table,
    values and intervals from its summary.json; /api/model names the best one's baseline."""
    import shutil

    import torch

    from dpolab.runs import RunFolder
    from dpolab.scoring.length import length_metrics
    from dpolab.serve.models import load_served_models

    sweep = shutil.copytree(sweep_dir, tmp_path / "sweep")
    trial = RunFolder(sweep / "trials" / "trial-001")
    chosen, rejected = torch.tensor([30, 12, 25, 8, 40, 16]), torch.tensor([10, 20, 25, 30, 12, 14])
    lengths = length_metrics(torch.tensor([0.4, -0.1, 0.2, 0.3, 0.5, -0.2]), chosen, rejected, chosen * 4, rejected * 4)
    summary = {k: v for k, v in trial.summary().items() if k != "format"}
    summary["eval"].update(lengths)
    trial.write_summary(summary)
    client = make_app(MODELS=load_served_models(str(sweep))).test_client()
    html = client.get("/experiments").get_data(as_text=True)
    balanced = (f"{lengths['rewards/accuracies_length_balanced']:.3f} [{lengths['rewards/accuracies_length_balanced_ci_low']:.2f}, "
                f"{lengths['rewards/accuracies_length_balanced_ci_high']:.2f}]")
    assert "Length-controlled evaluation" in html and balanced in html
    assert f"<td>{lengths['length/chosen_longer']:.3f} [" in html
    assert html.count("★ trial-001") == 2 and "trial-000</td>" not in html.split("Length-controlled evaluation")[1]
    assert client.get("/api/model").json["eval"]["length/chosen_longer"] == lengths["length/chosen_longer"]
