"""benchmarks/serve_load.py end to end on tiny-gpt2 (a few tokens): it starts the real `dpolab serve`
servers, drives them over HTTP, stops them, and writes the JSON behind BENCHMARKS.md. No timing is
asserted."""

from __future__ import annotations

import pytest

from tests.test_benchmarks_smoke import _run


@pytest.mark.slow
def test_serve_load_smoke(tmp_path):
    data = _run("serve_load.py", ["--model", "tiny-gpt2", "--precisions", "fp32", "--streams", "2",
                                  "--requests-per-stream", "1", "--new-tokens", "3", "--repeats", "1"],
                tmp_path / "serve.json")
    entry = data["results"]["fp32"]
    assert entry["batched"]["workers"] == 2 and entry["one_at_a_time"]["workers"] == 1
    for mode in ("batched", "one_at_a_time"):
        assert entry[mode]["requests"] == 2 and 2 <= entry[mode]["tokens"] <= 6  # EOS may end an answer early
        assert entry[mode]["tokens_per_s"]["median"] > 0
        assert 0 < entry[mode]["ttft_ms"]["p50"] <= entry[mode]["ttft_ms"]["p95"]
    assert entry["ratio_tokens_per_s"] > 0
