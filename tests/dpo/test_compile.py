"""``compile: true``: the torch.compile'd model trains to the eager model's losses."""

import shutil

import pytest

from dpolab.dpo.trainer import train
from tests.conftest import tiny_config

# Inductor fuses and reorders the float32 arithmetic: measured 2e-6 apart over these steps on a
# 2-core Xeon; 1e-5 still catches any real difference (a step's update moves the loss by > 1e-2).
COMPILE_LOSS_TOLERANCE = 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on CPU (inductor) needs a C++ compiler; none on PATH")
def test_compiled_training_matches_eager(tmp_path):
    config = dict(max_steps=3, max_train_pairs=12, max_eval_pairs=4, per_device_train_batch_size=4)
    eager = train(tiny_config(**config), tmp_path / "eager")
    compiled = train(tiny_config(**config, compile=True), tmp_path / "compiled")
    eager_losses = [r["loss"] for r in eager.metrics("train")] + [eager.summary()["eval"]["loss"]]
    compiled_losses = [r["loss"] for r in compiled.metrics("train")] + [compiled.summary()["eval"]["loss"]]
    assert len(eager_losses) == 4
    assert compiled_losses == pytest.approx(eager_losses, abs=COMPILE_LOSS_TOLERANCE)
    assert (compiled.model_dir / "model.safetensors").is_file()  # the compiled wrapper saves the plain model
