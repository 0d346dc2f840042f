"""``write_report``: plots, the hyper-parameter table and one self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import logging
from datetime import UTC, datetime
from pathlib import Path

from dpolab.report.collect import ReportData, collect
from dpolab.report.plots import CAPTIONS, CHARTS, RECORDED_CHARTS, has_gpu_power
from dpolab.report.table import (
    LENGTH_TABLE_COLUMNS,
    length_table_rows,
    table_figure,
    table_rows,
    to_html,
    to_markdown,
)

logger = logging.getLogger(__name__)

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1150px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.meta { color: #555; }
table.hp-table { border-collapse: collapse; font-size: 0.85rem; width: 100%; }
table.hp-table th, table.hp-table td { border: 1px solid #ccc; padding: 4px 6px; text-align: right; }
table.hp-table th { background: #dfe6f0; }
table.hp-table td:first-child, table.hp-table td:last-child { text-align: left; }
table.hp-table tr.best { background: #fff2b3; font-weight: bold; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
"""


def write_report(path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the report of a sweep or run folder into ``<folder>/report/``; return ``report.html``.

    Files: ``loss.png``, ``eval_loss.png``, ``rewards.png``, ``system.png``, ``table.md``,
    ``table.html``, ``table.png`` and ``report.html`` (images embedded: opens from disk, alone); when
    trials recorded them, ``length_table.md`` (length-controlled metrics), ``length_scatter.png``
    (margin against length difference per trial) and ``sample_lengths.png`` (verbosity drift).
    """
    data = collect(path)
    out = Path(out_dir) if out_dir else data.folder.report_dir
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    for name, plot in CHARTS.items():
        fig = plot(data.trials)
        fig.savefig(out / name)
        images[name] = (out / name).read_bytes()
    for name, (plot, recorded) in RECORDED_CHARTS.items():
        (out / name).unlink(missing_ok=True)  # a chart of records that are gone must not linger
        if any(recorded(t) for t in data.trials):
            plot(data.trials).savefig(out / name)
            images[name] = (out / name).read_bytes()
    length_rows = length_table_rows(data.trials)
    (out / "length_table.md").unlink(missing_ok=True)
    if length_rows:
        (out / "length_table.md").write_text(to_markdown(length_rows, LENGTH_TABLE_COLUMNS))
    rows = table_rows(data.trials)
    markdown = to_markdown(rows)
    (out / "table.md").write_text(markdown)
    table_html = to_html(rows)
    (out / "table.html").write_text(f"<!doctype html>\n<meta charset='utf-8'>\n<style>{STYLE}</style>\n{table_html}")
    table_figure(rows, f"{data.title}: hyper-parameters and results").savefig(
        out / "table.png", bbox_inches="tight", pad_inches=0.25)
    images["table.png"] = (out / "table.png").read_bytes()
    report = out / "report.html"
    report.write_text(render_html(data, table_html, images, to_html(length_rows, LENGTH_TABLE_COLUMNS)
                                  if length_rows else ""))
    logger.info("report written: %s", report)
    return report


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _sft_section(data: ReportData) -> str:
    """Stage 1 of the recipe, when the runs started from an SFT run: its held-out answer NLL per evaluation."""
    sft = data.sft
    if sft is None:
        return ""
    rows = "".join(f"<tr><td>{r['step']}</td><td>{r['loss']:.4f}</td></tr>" for r in sft.eval)
    return (f"<h2>Stage 1: SFT ({html.escape(sft.name)})</h2>\n<p class='meta'>supervised fine-tuning of "
            f"<code>{html.escape(str(sft.config.get('model')))}</code> on the chosen answers of "
            f"<code>{html.escape(str(sft.config.get('dataset')))}</code>; the DPO stage below starts from it "
            "and uses it as the reference.</p>\n<table class='hp-table'><tr><th>step</th><th>held-out answer "
            f"NLL</th></tr>{rows}</table>\n<h2>Stage 2: DPO</h2>\n")


def _reward_cell(reward: float | None) -> str:
    return "" if reward is None else f"{reward:.3f}"  # SFT samples have no implicit reward


def _samples_section(data: ReportData) -> str:
    """The latest samples of each trial that recorded some: policy vs reference on fixed held-out prompts."""
    parts = []
    for trial in (t for t in data.trials if t.samples):
        rows = "".join(
            f"<tr><td>{html.escape(s['prompt'][-300:])}</td><td>{html.escape(s['policy'])}</td>"
            f"<td>{html.escape(s['reference'])}</td><td>{_reward_cell(s['reward'])}</td></tr>"
            for s in trial.samples)
        parts.append(f"<h3>{html.escape(trial.name)} (step {trial.samples[0]['step']})</h3>\n<table class='hp-table'>"
                     f"<tr><th>prompt (end)</th><th>policy</th><th>reference</th><th>implicit reward</th></tr>{rows}</table>")
    return "<h2>Samples (latest evaluation)</h2>\n" + "\n".join(parts) + "\n" if parts else ""


LENGTH_NOTE = (
    "Length-controlled evaluation on the held-out pairs (final evaluation). The length-only baseline is the "
    "accuracy of always preferring the answer with more tokens. Length-balanced accuracy averages the reward "
    "accuracy over pairs whose chosen answer is longer and pairs whose chosen answer is shorter, so a model "
    "that only learned \"longer is better\" scores 0.5 on it; residual accuracy is the share of pairs whose "
    "margin is above its least-squares fit on the length difference. Brackets: 95% bootstrap intervals.")


def _length_section(length_html: str, images: dict[str, bytes]) -> str:
    if not length_html and not images:
        return ""
    figures = "".join(f"<figure>{_img(images[name], CAPTIONS[name])}<figcaption>{html.escape(CAPTIONS[name])}"
                      f"</figcaption></figure>" for name in RECORDED_CHARTS if name in images)
    table = f"<p class='meta'>{html.escape(LENGTH_NOTE)}</p>\n{length_html}" if length_html else ""
    return f"<h2>Length-controlled evaluation</h2>\n{table}{figures}\n"


def render_html(data: ReportData, table_html: str, images: dict[str, bytes], length_html: str = "") -> str:
    meta = []
    if data.kind == "sweep":
        info = data.info
        meta.append(f"mode <b>{html.escape(str(info.get('mode')))}</b>, objective "
                    f"<b>{html.escape(str(info.get('objective')))}</b> ({html.escape(str(info.get('direction')))}), "
                    f"{len(data.trials)} trial(s), {sum(t.finished for t in data.trials)} finished")
        if data.best:
            meta.append(f"best: <b>{html.escape(data.best['trial'])}</b> "
                        f"({html.escape(str(data.best['objective']))} = {data.best['value']:.4f}); model: "
                        f"<code>{html.escape(data.best['model_dir'])}</code>")
        for ref in info.get("reference") or []:
            meta.append(f"reference pass: {html.escape(ref.get('reference_cache', '?'))} "
                        f"({ref.get('reference_time_s', 0):.1f} s), shared by every trial")
    else:
        meta.append(f"model {html.escape(str(data.info.get('base_model')))} on "
                    f"{html.escape(str(data.info.get('dataset')))}")
    if not has_gpu_power(data.trials):
        meta.append("no GPU was seen: the system chart shows CPU use")
    figures = "\n".join(f"<figure>{_img(images[name], CAPTIONS[name])}<figcaption>{html.escape(CAPTIONS[name])}"
                        f"</figcaption></figure>" for name in CHARTS)
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(data.title)} - dpolab report</title>
<style>{STYLE}</style></head>
<body>
<h1>{html.escape(data.title)}</h1>
<p class="meta">{"<br>".join(meta)}<br>folder: <code>{html.escape(str(data.path))}</code> · generated {generated}</p>
{_sft_section(data)}<h2>Hyper-parameters and results</h2>
{table_html}
<p class="meta">★ = best configuration. Eval metrics are on held-out pairs at the end of training.</p>
<h2>Charts</h2>
{figures}
{_length_section(length_html, {n: images[n] for n in RECORDED_CHARTS if n in images})}{_samples_section(data)}<h2>Table as an image</h2>
<figure>{_img(images["table.png"], "hyper-parameter table")}</figure>
</body></html>
"""
