"""The HTML pages: the chat (with compare mode) and, for a sweep's model, the experiments page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, abort, render_template, send_from_directory

from dpolab.report.collect import collect
from dpolab.report.plots import CAPTIONS
from dpolab.report.table import LENGTH_TABLE_COLUMNS, length_table_rows, table_rows, to_html
from dpolab.runs import SweepFolder
from dpolab.serve import jobs

bp = Blueprint("ui", __name__)

PLOT_ORDER = ("eval_loss.png", "rewards.png", "length_scatter.png", "sample_lengths.png", "loss.png", "system.png")


@bp.get("/")
def index() -> Any:
    return render_template("ui/chat.html")


def _sweep_dir() -> Path | None:
    eng = jobs.engine()
    return eng.models.sweep_dir if eng.models is not None else None


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
    trials = collect(sweep.path).trials
    return render_template("ui/experiments.html", sweep=sweep.info(), images=images,
                           table_html=to_html(table_rows(trials)),
                           length_html=to_html(length_table_rows(trials), LENGTH_TABLE_COLUMNS)
                           if length_table_rows(trials) else None,
                           sampled_trials=[t for t in trials if t.samples],  # each trial's latest evaluation
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
