"""--ref-model: the reference pass scores a model other than the starting one, and the cache key
names that reference's weights (so a run folder and its model/ folder share one cache entry)."""

from __future__ import annotations

import math

import pytest

from dpolab.dpo.trainer import train
from dpolab.errors import ConfigError
from dpolab.model import build_builtin, load_model, weights_fingerprint
from tests.conftest import tiny_config


@pytest.mark.slow
def test_ref_model_from_a_run_folder_or_its_model_folder(tiny_run, tmp_path):
    common = dict(max_steps=1, max_train_pairs=8, max_eval_pairs=4, cache_dir=str(tmp_path / "cache"))
    by_run = train(tiny_config(ref_model=str(tiny_run.path), **common), tmp_path / "by-run")
    by_folder = train(tiny_config(ref_model=str(tiny_run.model_dir), **common), tmp_path / "by-folder")

    trained = weights_fingerprint(load_model(str(tiny_run.model_dir)))
    assert trained != weights_fingerprint(build_builtin("tiny-gpt2"))
    first, second = by_run.summary(), by_folder.summary()
    assert first["reference_key"].startswith(f"{trained}-") and first["reference_cache"] == "miss"
    assert second["reference_key"] == first["reference_key"] and second["reference_cache"] == "hit"
    # The policy starts at tiny-gpt2, not at its reference: step 1 is no longer ln 2 / zero margin.
    step1 = by_run.metrics("train")[0]
    assert abs(step1["loss"] - math.log(2)) > 1e-3 and step1["rewards/margins"] != 0.0
    assert step1["loss"] == pytest.approx(by_folder.metrics("train")[0]["loss"], abs=1e-6)


def test_ref_model_with_another_vocabulary_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "small-vocab"
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=16, n_layer=1, n_head=2)).save_pretrained(folder)
    with pytest.raises(ConfigError, match="vocabulary of 1000 tokens"):
        train(tiny_config(ref_model=str(folder), max_steps=1, max_train_pairs=8, max_eval_pairs=4,
                          cache_dir=str(tmp_path / "cache")), tmp_path / "run")
