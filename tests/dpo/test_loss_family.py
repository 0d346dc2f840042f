"""The loss family in training: reference-free losses skip the reference pass; LD-DPO, WPO and
weighted loss terms train through the answer-only head and the cached reference."""

from __future__ import annotations

import math

import pytest

from dpolab.dpo.trainer import train
from tests.conftest import tiny_config

COMMON = dict(max_steps=2, max_train_pairs=8, max_eval_pairs=8, eval_steps=2, max_length=128, max_prompt_length=64)


@pytest.mark.slow
def test_simpo_run_trains_without_a_reference(tmp_path, caplog):
    run = train(tiny_config(**COMMON, loss_type="simpo", beta=2.0, cache_dir=str(tmp_path / "cache")), tmp_path / "run")
    summary = run.summary()
    assert summary["reference_free"] is True and summary["reference_cache"] == "none"
    assert not (tmp_path / "cache" / "reference").exists()  # no reference pass, nothing cached
    first = run.metrics("train")[0]
    # Step 1: SimPO's rewards are beta x per-token log pi (no reference): far from 0 for a random model.
    assert first["rewards/chosen"] < -10
    assert math.isfinite(summary["eval"]["loss"])


@pytest.mark.slow
def test_ld_dpo_wpo_and_weighted_terms_train_on_the_cached_reference(tmp_path):
    config = tiny_config(**COMMON, loss_type="sigmoid,bco_pair,sft", loss_weights="1,0.5,0.1", ld_alpha=0.5,
                         use_weighting=True, cache_dir=str(tmp_path / "cache"))
    run = train(config, tmp_path / "run")
    assert run.summary()["reference_cache"] == "miss"
    assert [p.name.endswith("-tails.pt") for p in (tmp_path / "cache" / "reference").iterdir()] == [True]
    first = run.metrics("train")[0]
    # Step 1, policy == reference: every log-ratio is 0, so sigmoid = ln 2, bco_pair = 2 ln 2, and the sft
    # term is the chosen NLL; all times the WPO weight (< 1: a random model's tokens are unlikely).
    unweighted = math.log(2) + 0.5 * 2 * math.log(2) + 0.1 * first["nll_loss"]
    assert 0 < first["loss"] < unweighted
    assert first["rewards/margins"] == 0
    assert math.isfinite(run.summary()["eval"]["loss"])
