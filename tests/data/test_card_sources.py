"""The model card names every data source with its split, weight and format, and the template."""

from dpolab.hub.card import card_body
from dpolab.runs import RunFolder
from tests.hub.factory import EVALS, make_run


def test_card_lists_sources_split_weight_format_and_template(tmp_path):
    run = make_run(tmp_path / "run", EVALS["trial-000"], with_model=False)
    report = {**run.data_report(), "chat_template": "tokenizer", "sources": [
        {"source": "org/stack", "format": "explicit", "weight": 0.3, "splits": {"train": "train", "eval": "test"},
         "rows_read": 40, "pairs": {"train": 9, "eval": 3}},
        {"source": "mine.jsonl", "format": "conversational", "weight": 0.7, "splits": {"all": "all files"},
         "rows_read": 40, "pairs": {"all": 28}}]}
    run.write_data_report(report)
    body = card_body(RunFolder.open(run.path), None, [], None)
    assert "| `org/stack` | train: `train`, eval: `test` | 0.3 | explicit | 12 |" in body
    assert "| `mine.jsonl` | all: `all files` | 0.7 | conversational | 28 |" in body
    assert "Prompt format: chat template (`tokenizer`), rendered with `apply_chat_template`." in body
