"""``dpolab report SWEEP_OR_RUN_DIR``."""

from __future__ import annotations

import argparse

from dpolab.paths import user_path


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report", help="plots, hyper-parameter table and report.html for a sweep or run",
        description="Write PNG charts, the hyper-parameter table (Markdown, HTML, PNG) and one "
        "self-contained report.html into <folder>/report/.")
    report.add_argument("path", type=user_path, metavar="SWEEP_OR_RUN_DIR", help="a sweep folder or a run folder")
    report.add_argument("--output-dir", type=user_path, help="where to write (default: <folder>/report)")
    report.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from dpolab.report.writer import write_report

    path = write_report(args.path, args.output_dir)
    print((path.parent / "table.md").read_text())
    if (path.parent / "length_table.md").is_file():
        print("Length-controlled evaluation (held-out pairs):\n" + (path.parent / "length_table.md").read_text())
    print(f"report: {path}")
    return 0
