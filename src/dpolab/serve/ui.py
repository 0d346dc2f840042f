"""The HTML pages: the chat (with compare mode) and, for a sweep's or a run's model, the experiments page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, abort, render_template, send_from_directory

from dpolab.report.collect import collect
from dpolab.report.plots import CAPTIONS
from dpolab.report.table import LENGTH_TABLE_COLUMNS, length_table_rows, table_rows, to_html
from dpolab.runs import RunFolder, SweepFolder
from dpolab.serve import jobs

bp = Blueprint("ui", __name__)

PLOT_ORDER = ("eval_loss.png", "rewards.png", "length_scatter.png", "sample_lengths.png", "loss.png", "system.png")


@bp.get("/")
def index() -> Any:
    return render_template("ui/chat.html")


@bp.get("/experiments")
def experiments() -> Any:
    folder = jobs.records_dir()
    if folder is None:
        return render_template("ui/experiments.html", records=None, loading=not jobs.engine().ready.is_set())
    data = collect(folder)
    report = data.folder.report_dir
    # `dpolab report` writes loss.png, eval_loss.png, rewards.png, system.png and table.png; the
    # table is already rendered above as HTML, so its picture is left out.
    names = {p.name for p in report.glob("*.png")} - {"table.png"} if report.is_dir() else set()
    images = [n for n in PLOT_ORDER if n in names] + sorted(names - set(PLOT_ORDER))
    length_rows = length_table_rows(data.trials)
    return render_template("ui/experiments.html", records=data.info, kind=data.kind, images=images,
                           table_html=to_html(table_rows(data.trials)),
                           length_html=to_html(length_rows, LENGTH_TABLE_COLUMNS) if length_rows else None,
                           sampled_trials=[t for t in data.trials if t.samples],  # each trial's latest evaluation
                           captions=CAPTIONS, has_report=report.is_dir(),
                           full_report=(report / "report.html").is_file(), records_path=str(folder), loading=False)


def _report_dir() -> Path:
    folder = jobs.records_dir()
    if folder is None:
        abort(404)
    return (SweepFolder if SweepFolder.is_sweep(folder) else RunFolder)(folder).report_dir


@bp.get("/experiments/report.html")
def full_report() -> Any:
    """`dpolab report`'s self-contained report.html (inline styles, data: images, no scripts)."""
    response = send_from_directory(_report_dir(), "report.html")
    # Our own generated file, but still: styles only, never scripts.
    response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    return response


@bp.get("/experiments/report/<path:name>")
def report_file(name: str) -> Any:
    """Plots from the report/ folder (send_from_directory refuses paths that leave the folder)."""
    if not name.endswith(".png"):
        abort(404)
    return send_from_directory(_report_dir(), name)
