"""The HTML pages: the chat (with compare mode) and, for a sweep's model, the experiments page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, abort, render_template, send_from_directory

from dpolab.report.plots import CAPTIONS
from dpolab.runs import SweepFolder
from dpolab.serve import jobs

bp = Blueprint("ui", __name__)

# Config keys that differ between trials for bookkeeping reasons, not as hyperparameters.
NOT_HYPERPARAMETERS = {"run_name", "cache_dir", "report_to", "output_dir", "device", "num_threads"}
PLOT_ORDER = ("eval_loss.png", "rewards.png", "loss.png", "system.png")
EVAL_COLUMNS = (("loss", "eval loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "margin"))


@bp.get("/")
def index() -> Any:
    return render_template("ui/chat.html")


def _sweep_dir() -> Path | None:
    eng = jobs.engine()
    return eng.models.sweep_dir if eng.models is not None else None


def sweep_table(sweep: SweepFolder) -> dict[str, Any]:
    """Hyperparameters that vary across the finished trials, with each trial's eval metrics."""
    trials = sweep.trials()
    configs = {t.path.name: (t.config() if t.config_path.exists() else {}) for t in trials}
    keys = sorted({k for c in configs.values() for k in c} - NOT_HYPERPARAMETERS)
    varied = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1] or \
        [k for k in ("beta", "learning_rate") if k in keys]
    best = sweep.best().get("trial") if sweep.has_best() else None
    rows = []
    for trial in trials:
        name = trial.path.name
        evals = trial.summary().get("eval", {})
        rows.append({"name": name, "best": name == best,
                     "params": [configs[name].get(k) for k in varied],
                     "metrics": [evals.get(k) for k, _ in EVAL_COLUMNS]})
    return {"params": varied, "metrics": [label for _, label in EVAL_COLUMNS], "rows": rows}


@bp.get("/experiments")
def experiments() -> Any:
    sweep_dir = _sweep_dir()
    if sweep_dir is None:
        return render_template("ui/experiments.html", sweep=None, loading=not jobs.engine().ready.is_set())
    sweep = SweepFolder.open(sweep_dir)
    report = sweep.report_dir
    # `dpolab report` writes loss.png, eval_loss.png, rewards.png, system.png and table.png; the
    # table is already rendered above as HTML, so its picture is left out.
    names = {p.name for p in report.glob("*.png")} - {"table.png"} if report.is_dir() else set()
    images = [n for n in PLOT_ORDER if n in names] + sorted(names - set(PLOT_ORDER))
    return render_template("ui/experiments.html", sweep=sweep.info(), table=sweep_table(sweep), images=images,
                           captions=CAPTIONS, has_report=report.is_dir(),
                           full_report=(report / "report.html").is_file(), sweep_path=str(sweep_dir), loading=False)


@bp.get("/experiments/report.html")
def full_report() -> Any:
    """`dpolab report`'s self-contained report.html (inline styles, data: images, no scripts)."""
    sweep_dir = _sweep_dir()
    if sweep_dir is None:
        abort(404)
    response = send_from_directory(SweepFolder(sweep_dir).report_dir, "report.html")
    # Our own generated file, but still: styles only, never scripts.
    response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return response


@bp.get("/experiments/report/<path:name>")
def report_file(name: str) -> Any:
    """Plots from the sweep's report/ (send_from_directory refuses paths that leave the folder)."""
    sweep_dir = _sweep_dir()
    if sweep_dir is None or not name.endswith(".png"):
        abort(404)
    return send_from_directory(SweepFolder(sweep_dir).report_dir, name)
