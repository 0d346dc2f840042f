"""Today's token ids and data report on the bundled sample are pinned: a new reader, format layer or
tokenizer path must reproduce them bit for bit (``sample_golden.json`` was recorded with the
pre-``datasets``-map pipeline, ``tests/data/record_golden.py``)."""

import json
from pathlib import Path

import pytest

from tests.data.record_golden import CONFIGS, GOLDEN, snapshot


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sample_gives_todays_ids_and_report(name, tmp_path):
    golden = json.loads(GOLDEN.read_text())[name]
    now = snapshot(name, str(tmp_path))
    report = {**now["report"], "files": [Path(f).name for f in now["report"]["files"]]}
    assert {k: report[k] for k in golden["report"]} == golden["report"]
    assert now["columns"] == golden["columns"]
