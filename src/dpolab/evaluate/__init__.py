"""``dpolab evaluate``: held-out pair metrics and a seeded generation eval, optionally judged by a
reward model (win rate with a 95% interval)."""

from dpolab.evaluate.run import evaluate

__all__ = ["evaluate"]
