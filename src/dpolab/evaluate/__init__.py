"""``dpolab evaluate``: held-out pair metrics and a seeded generation eval, optionally judged by a
reward model (win rate with a 95% interval)."""

from dpolab.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {'evaluate': 'dpolab.evaluate.run'})
