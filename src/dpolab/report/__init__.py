"""``dpolab report``: charts, the hyper-parameter table and a self-contained HTML page for a sweep or run.

Public API (used by ``dpolab demo``): ``write_report(sweep_or_run_dir) -> Path`` of ``report.html``.
"""

from importlib import import_module
from typing import Any

# Resolved on first use (PEP 562): `dpolab --help` imports every stage's cli.py, which must not
# pull in torch or matplotlib through this package.
_EXPORTS = {'write_report': 'dpolab.report.writer'}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
