"""Package attributes resolved on first use (PEP 562).

`dpolab --help` imports every stage's ``cli.py``, and with it the stage's package: a package that
re-exported its API eagerly would pull in torch or matplotlib just to print the help.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package``: each name in ``exports`` comes from its module."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(exports[name]), name)

    return sorted(exports), __getattr__
