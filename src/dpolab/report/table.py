"""The hyper-parameter table: one row per configuration, best row marked; Markdown, HTML and PNG.
Beside it, the length-controlled table: what each configuration's reward accuracy is worth once
the answers' lengths are accounted for (``dpolab.scoring.length``)."""

from __future__ import annotations

import html
from typing import Any

from matplotlib.figure import Figure

from dpolab.report.collect import TrialRecords

COLUMNS = ["trial", "lr", "batch", "weight decay", "epochs", "beta", "loss type", "dtype", "eval loss",
           "reward acc.", "reward margin", "wall time (s)", "pairs/s", "status"]
LENGTH_TABLE_COLUMNS = ["trial", "reward acc. [95% CI]", "length-balanced acc. [95% CI]", "acc. chosen longer (n)",
                       "acc. chosen shorter (n)", "acc. similar length (n)", "residual acc. [95% CI]",
                       "Spearman ρ (margin, Δtokens)", "length-only baseline [95% CI]", "tokens chosen / rejected"]
BEST_MARK = "★"


def _num(value: Any, fmt: str) -> str:
    return "—" if value is None else format(float(value), fmt)


def table_rows(trials: list[TrialRecords]) -> list[dict[str, str]]:
    """Formatted cells per trial (same strings in every output format)."""
    rows = []
    for t in trials:
        c, s = t.config, t.summary or {}
        ev = s.get("eval", {})
        accumulation = int(c.get("gradient_accumulation_steps") or 1)
        batch = c.get("per_device_train_batch_size")
        epochs = (s.get("train") or {}).get("epochs", c.get("num_train_epochs"))
        status = t.state if not t.error or t.state == "complete" else f"{t.state}: {t.error}"
        rows.append({
            "trial": f"{BEST_MARK} {t.name}" if t.is_best else t.name,
            "lr": _num(c.get("learning_rate"), ".0e") if c.get("learning_rate") is not None else "—",
            "batch": "—" if batch is None else (f"{batch}×{accumulation}" if accumulation > 1 else str(batch)),
            "weight decay": "—" if c.get("weight_decay") is None else f"{float(c['weight_decay']):g}",
            "epochs": "—" if epochs is None else f"{float(epochs):g}",
            "beta": "—" if c.get("beta") is None else f"{float(c['beta']):g}",
            "loss type": str(c.get("loss_type", "—")),
            "dtype": t.resolved.get("dtype") or "—",  # what the run trained in, not the config's "auto"
            "eval loss": _num(ev.get("loss"), ".4f"),
            "reward acc.": _num(ev.get("rewards/accuracies"), ".3f"),
            "reward margin": _num(ev.get("rewards/margins"), ".4f"),
            "wall time (s)": _num(s.get("wall_time_s"), ".1f"),
            "pairs/s": _num(s.get("pairs_per_s"), ".2f"),
            "status": status[:80],
        })
    return rows


def with_interval(ev: dict[str, Any], name: str) -> str:
    """``0.612 [0.55, 0.67]``: a value with its bootstrap interval, "—" when not recorded."""
    if ev.get(name) is None:
        return "—"
    if ev.get(f"{name}_ci_low") is None:
        return f"{ev[name]:.3f}"
    return f"{ev[name]:.3f} [{ev[f'{name}_ci_low']:.2f}, {ev[f'{name}_ci_high']:.2f}]"


def with_pairs(ev: dict[str, Any], stratum: str) -> str:
    accuracy, pairs = ev.get(f"rewards/accuracies_{stratum}"), ev.get(f"length/pairs_{stratum}")
    return "—" if pairs is None else f"{_num(accuracy, '.3f')} ({pairs})"


def length_table_rows(trials: list[TrialRecords]) -> list[dict[str, str]]:
    """The length-controlled metrics of each trial's final evaluation, formatted (trials that
    recorded none - unfinished, SFT, TRL engine - are left out)."""
    rows = []
    for t in trials:
        ev = (t.summary or {}).get("eval") or {}
        if "length/chosen_longer" not in ev:
            continue
        rows.append({
            "trial": f"{BEST_MARK} {t.name}" if t.is_best else t.name,
            "reward acc. [95% CI]": with_interval(ev, "rewards/accuracies"),
            "length-balanced acc. [95% CI]": with_interval(ev, "rewards/accuracies_length_balanced"),
            "acc. chosen longer (n)": with_pairs(ev, "chosen_longer"),
            "acc. chosen shorter (n)": with_pairs(ev, "chosen_shorter"),
            "acc. similar length (n)": with_pairs(ev, "similar_length"),
            "residual acc. [95% CI]": with_interval(ev, "rewards/accuracies_length_residual"),
            "Spearman ρ (margin, Δtokens)": _num(ev.get("length/margin_spearman"), "+.3f"),
            "length-only baseline [95% CI]": with_interval(ev, "length/chosen_longer"),
            "tokens chosen / rejected": f"{ev['length/chosen_tokens']:.1f} / {ev['length/rejected_tokens']:.1f}",
        })
    return rows


def to_markdown(rows: list[dict[str, str]], columns: list[str] = COLUMNS) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        best = row["trial"].startswith(BEST_MARK)
        cells = [f"**{cell(row[c])}**" if best and c in ("trial", "eval loss") else cell(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{BEST_MARK} = best configuration (objective of the sweep).\n"


def to_html(rows: list[dict[str, str]], columns: list[str] = COLUMNS) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        best = row["trial"].startswith(BEST_MARK)
        cells = "".join(f"<td>{html.escape(row[c])}</td>" for c in columns)
        body.append(f'<tr class="best">{cells}</tr>' if best else f"<tr>{cells}</tr>")
    return (f'<table class="hp-table">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body)
            + "\n</tbody>\n</table>\n")


def table_figure(rows: list[dict[str, str]], title: str) -> Figure:
    """The table as an image (for slides and the model card), best row highlighted."""
    columns = [c for c in COLUMNS if c != "status"] + ["status"]
    cells = [[row[c] if c != "status" else row[c][:28] for c in columns] for row in rows] or [["—"] * len(columns)]
    fig = Figure(figsize=(30, 1.0 + 0.3 * max(1, len(rows))), dpi=120)
    ax = fig.add_subplot()
    ax.axis("off")
    ax.set_title(title, fontsize=12, fontweight="bold")
    table = ax.table(cellText=cells, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.4)
    table.auto_set_column_width(list(range(len(columns))))
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_facecolor("#dfe6f0")
            cell.set_text_props(fontweight="bold")
        elif rows and rows[r - 1]["trial"].startswith(BEST_MARK):
            cell.set_facecolor("#fff2b3")
    # Fit the figure to the table: auto column widths make its size known only once drawn.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    width = table.get_window_extent().width / fig.dpi
    fig.set_size_inches(max(6.0, width + 0.6), fig.get_size_inches()[1])
    return fig
