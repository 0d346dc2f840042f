"""``dpolab report``: charts, the hyper-parameter table and a self-contained HTML page for a sweep or run.

Public API (used by ``dpolab demo``): ``write_report(sweep_or_run_dir) -> Path`` of ``report.html``.
"""

from dpolab.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {'write_report': 'dpolab.report.writer'})
