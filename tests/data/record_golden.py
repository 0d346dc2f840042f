"""Record what today's data pipeline produces on the bundled sample (recorded once, before a change).

``python -m tests.data.record_golden`` writes ``sample_golden.json``: per config, the data report
and a SHA-256 of every column of every split. ``test_golden.py`` checks the pipeline against it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).with_name("sample_golden.json")
# Full sample at the default budget, the tests' small config, and a tight budget that truncates a lot.
CONFIGS = {
    "full-512": dict(max_train_pairs=None, max_eval_pairs=None),
    "tiny-64-32": dict(),
    "tight-128": dict(max_length=128, max_prompt_length=64, max_train_pairs=None, max_eval_pairs=None, seed=7),
}


def column_digest(values: list) -> str:
    return hashlib.sha256(json.dumps(values, ensure_ascii=False).encode()).hexdigest()


def snapshot(name: str, cache_dir: str) -> dict:
    from dpolab.data import prepare_data
    from dpolab.model import load_tokenizer
    from tests.conftest import tiny_config

    datasets, report, _ = prepare_data(tiny_config(cache_dir=cache_dir, **CONFIGS[name]), load_tokenizer("tiny-gpt2"))
    return {"report": report.to_dict(),
            "columns": {split: {col: column_digest(datasets[split].to_dict()[col]) for col in datasets[split].column_names}
                        for split in sorted(datasets)}}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:
        GOLDEN.write_text(json.dumps({name: snapshot(name, cache) for name in CONFIGS}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
