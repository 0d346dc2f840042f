"""The golden run: the first 5 logged losses of a seeded tiny run, pinned in golden_losses.json.

Re-record (only after an intended change to the maths or the data pipeline) with:

    python -m tests.dpo.golden
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from dpolab.config import TrainConfig

GOLDEN_PATH = Path(__file__).with_name("golden_losses.json")
GOLDEN_CONFIG = dict(model="tiny-gpt2", dataset="hh-rlhf-sample", max_train_pairs=64, max_eval_pairs=16,
                     per_device_train_batch_size=4, max_steps=5, logging_steps=1, learning_rate=1e-3,
                     seed=0, beta=0.1, loss_type="sigmoid", dtype="fp32")  # fp32 on every CPU (auto may pick bf16)


def golden_losses(output_dir: Path, **overrides) -> list[float]:
    from dpolab.dpo.trainer import train

    run = train(TrainConfig(**{**GOLDEN_CONFIG, **overrides}), output_dir)
    return [row["loss"] for row in run.metrics("train")]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        losses = golden_losses(Path(tmp) / "golden", cache_dir=str(Path(tmp) / "cache"))
    GOLDEN_PATH.write_text(json.dumps({"config": GOLDEN_CONFIG, "losses": losses}, indent=2) + "\n")
    print(f"wrote {GOLDEN_PATH}: {losses}", file=sys.stderr)
