"""Each benchmark script runs end to end on tiny-gpt2 in seconds and writes the JSON fields that
BENCHMARKS.md is built from. These are smoke runs: no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def _run(script: str, args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|" in proc.stdout  # the markdown table was printed
    return json.loads(out.read_text())


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    pytest.importorskip("trl")
    data = _run("train_throughput.py", ["--models", "tiny-gpt2", "--variants", "dpolab", "trl_tuned", "--repeats",
                                        "1", "--steps", "1", "--warmup", "1", "--batch", "2", "--max-length", "128"],
                tmp_path / "train.json")
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["cpu_model"]
    assert {r["variant"] for r in data["runs"]} == {"dpolab", "trl_tuned"}
    for run in data["runs"]:
        assert run["measured_steps"] == 1 and run["pairs"] == 2
        for key in ("pairs_per_s", "tokens_per_s", "amortised_pairs_per_s", "peak_rss_mb", "reference_s"):
            assert run[key] > 0, key
        assert run["amortised_pairs_per_s"] < run["pairs_per_s"]  # the reference pass costs something
    variants = data["summary"]["tiny-gpt2"]["variants"]
    assert set(variants["dpolab"]["pairs_per_s"]) == {"median", "min", "max", "n"}
    assert data["summary"]["tiny-gpt2"]["ratios"]["dpolab_vs_trl_tuned"]["pairs_per_s"] > 0


@pytest.mark.slow
def test_generate_latency_smoke(tmp_path):
    data = _run("generate_latency.py", ["--model", "tiny-gpt2", "--repeats", "1", "--new-tokens", "3",
                                        "--prompt-tokens", "16", "--quality-pairs", "1", "--agree-prompts", "1",
                                        "--agree-tokens", "3"], tmp_path / "gen.json")
    assert set(data["results"]) == {"plain_fp32", "fp32", "bf16", "int8"}
    for precision, result in data["results"].items():
        assert result["ttft_ms"]["median"] > 0, precision
        assert "ratio_to_floor" in result and "speedup_vs_plain_fp32" in result
        quality = data["quality"][precision]
        assert 0 <= quality["greedy_agreement"] <= 1
        assert quality["answer_nll_per_token"] > 0
    assert data["quality"]["plain_fp32"]["greedy_agreement"] == 1.0  # the reference agrees with itself
    assert data["prompt_tokens"] == 16 and data["new_tokens"] == 3


@pytest.mark.slow
def test_data_prep_smoke(tmp_path):
    data = _run("data_prep.py", ["--repeat", "1", "--variants", "after"], tmp_path / "data.json")
    (run,) = data["runs"]
    assert run["rows_read"] == 2312 and run["kept"] == {"train": 2073, "eval": 230}
    assert run["seconds"] > 0 and run["peak_rss_mb"] > 0 and run["cache_hit_s"] > 0
