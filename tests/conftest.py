"""Shared fixtures. Everything runs on CPU with the built-in tiny GPT-2 and the bundled real
HH-RLHF sample; caches go to a per-session temporary folder, never to the user's home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpolab.config import TrainConfig


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("dpolab-cache")
    os.environ["DPOLAB_CACHE"] = str(cache)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # `dtype: auto` resolves the same on every CPU and under any load: fp32 unless a run asks, or
    # unless this switch says bf16 (`make test-bf16` runs the CLI-level tests so, as an AMX CPU would).
    os.environ.setdefault("DPOLAB_AUTO_DTYPE", "fp32")
    return cache


def tiny_config(**overrides) -> TrainConfig:
    """A run that takes seconds: tiny GPT-2, 64 real training pairs, 32 held out."""
    values = dict(model="tiny-gpt2", dataset="hh-rlhf-sample", max_train_pairs=64, max_eval_pairs=32,
                  per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=8,
                  logging_steps=1, learning_rate=1e-3, seed=0,
                  dtype="fp32")  # exact comparisons: on an AMX CPU `auto` would pick bf16
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, isolated_cache: Path):
    """A finished tiny run folder (model/, metrics, summary) shared by every test that only reads it."""
    from dpolab.dpo.trainer import train

    return train(tiny_config(eval_steps=4), tmp_path_factory.mktemp("runs") / "tiny")
