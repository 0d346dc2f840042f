"""``dpolab evaluate``: held-out pair metrics and a seeded generation eval, optionally judged by a
reward model (win rate with a 95% interval)."""

from importlib import import_module
from typing import Any

# Resolved on first use (PEP 562): `dpolab --help` imports every stage's cli.py, which must not
# pull in torch or matplotlib through this package.
_EXPORTS = {'evaluate': 'dpolab.evaluate.run'}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
