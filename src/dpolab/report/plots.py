"""The report's charts. Each function returns a matplotlib ``Figure`` (no pyplot state, so the
figure can be checked - lines, titles, labels - before it is saved)."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from dpolab.report.collect import TrialRecords

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]


def color(index: int) -> str:
    return COLORS[index % len(COLORS)]


def _label(trial: TrialRecords) -> str:
    return f"{trial.name} (best)" if trial.is_best else trial.name


def _finish(fig: Figure, ax, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def plot_train_loss(trials: list[TrialRecords]) -> Figure:
    """Training loss vs optimizer step, one line per configuration with train logs."""
    fig = Figure(figsize=(8, 4.8), dpi=110)
    ax = fig.add_subplot()
    for i, t in enumerate(trials):
        if t.train:
            ax.plot([r["step"] for r in t.train], [r["loss"] for r in t.train], color=color(i),
                    label=_label(t), linewidth=2.2 if t.is_best else 1.4, marker="." if len(t.train) < 30 else None)
    _finish(fig, ax, "Training loss per configuration", "optimizer step", "DPO loss (nats)")
    fig.tight_layout()
    return fig


def plot_eval_loss(trials: list[TrialRecords]) -> Figure:
    """Final eval loss per configuration (bars; best highlighted) beside eval loss vs step (lines)."""
    fig = Figure(figsize=(11, 4.8), dpi=110)
    ax_bar, ax_line = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    done = [(i, t) for i, t in enumerate(trials) if t.summary and t.summary.get("eval", {}).get("loss") is not None]
    values = [t.summary["eval"]["loss"] for _, t in done]
    bars = ax_bar.bar(range(len(done)), values, color=[color(i) for i, _ in done],
                      edgecolor=["black" if t.is_best else "none" for _, t in done], linewidth=2)
    ax_bar.set_xticks(range(len(done)), [_label(t) for _, t in done], rotation=20, ha="right", fontsize=8)
    ax_bar.bar_label(bars, fmt="%.4f", fontsize=8)
    if values:
        low, high = min(values), max(values)
        pad = max(0.02, (high - low) * 0.5)
        ax_bar.set_ylim(max(0.0, low - pad), high + pad)
    _finish(fig, ax_bar, "Final eval loss per configuration", "configuration", "eval DPO loss (nats)", legend=False)
    for i, t in enumerate(trials):
        rows = [r for r in t.eval if r.get("loss") is not None]
        if rows:
            ax_line.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color(i), marker="o",
                         markersize=3, label=_label(t))
    _finish(fig, ax_line, "Eval loss over training", "optimizer step", "eval DPO loss (nats)")
    fig.tight_layout()
    return fig


def plot_rewards(trials: list[TrialRecords]) -> Figure:
    """Reward margin and reward accuracy on the held-out pairs at every evaluation."""
    fig = Figure(figsize=(11, 4.5), dpi=110)
    ax_margin, ax_acc = fig.subplots(1, 2)
    for i, t in enumerate(trials):
        rows = [r for r in t.eval if "rewards/margins" in r]
        if rows:
            steps = [r["step"] for r in rows]
            ax_margin.plot(steps, [r["rewards/margins"] for r in rows], color=color(i), marker="o", markersize=3,
                           label=_label(t))
            ax_acc.plot(steps, [r["rewards/accuracies"] for r in rows], color=color(i), marker="o", markersize=3,
                        label=_label(t))
    ax_margin.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax_acc.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    _finish(fig, ax_margin, "Reward margin (eval)", "optimizer step", "chosen − rejected reward (β·nats)")
    _finish(fig, ax_acc, "Reward accuracy (eval)", "optimizer step", "fraction of pairs, chosen > rejected")
    ax_acc.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    return fig


def has_gpu_power(trials: list[TrialRecords]) -> bool:
    return any(g.get("power_w") is not None for t in trials for r in t.system for g in r.get("gpus") or [])


def plot_system(trials: list[TrialRecords]) -> Figure:
    """GPU power (W, all GPUs summed) over time when NVML saw a GPU, else process CPU %."""
    gpu = has_gpu_power(trials)
    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot()
    for i, t in enumerate(trials):
        if not t.system:
            continue
        times = [r["time_s"] for r in t.system]
        if gpu:
            values = [sum(g.get("power_w") or 0.0 for g in r.get("gpus") or []) for r in t.system]
        else:
            values = [r.get("cpu_percent", 0.0) for r in t.system]
        ax.plot(times, values, color=color(i), label=_label(t), marker="." if len(times) < 30 else None)
    ax.set_ylim(bottom=0)  # absolute scale: a flat 195-198 % must not look like a swing
    if gpu:
        _finish(fig, ax, "GPU power during training", "time since training start (s)", "GPU power, all GPUs (W)")
    else:
        _finish(fig, ax, "CPU use during training (no GPU)", "time since training start (s)",
                "process CPU (%; 100 = one core)")
    fig.tight_layout()
    return fig


def plot_length_scatter(trials: list[TrialRecords]) -> Figure:
    """Per trial with per-pair records: reward margin against the answers' token-length difference on
    the held-out pairs of the final evaluation, with the least-squares line the residual accuracy
    is measured from. A model that learned length puts the points along a rising line."""
    shown = [(i, t) for i, t in enumerate(trials) if t.eval_pairs]
    columns = min(3, len(shown)) or 1
    rows = math.ceil(len(shown) / columns) or 1
    fig = Figure(figsize=(4.6 * columns, 4.0 * rows), dpi=110)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (i, t) in zip(axes, shown, strict=False):
        d = np.array([p["chosen_tokens"] - p["rejected_tokens"] for p in t.eval_pairs], dtype=float)
        margins = np.array([p["margin"] for p in t.eval_pairs], dtype=float)
        ax.scatter(d, margins, s=10, alpha=0.6, color=color(i))
        if np.ptp(d) > 0:
            slope, intercept = np.polyfit(d, margins, 1)
            xs = np.array([d.min(), d.max()])
            ax.plot(xs, intercept + slope * xs, color="black", linewidth=1, label=f"fit: {slope:+.3g} per token")
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        rho = ((t.summary or {}).get("eval") or {}).get("length/margin_spearman")
        title = _label(t) + ("" if rho is None else f": Spearman ρ {rho:+.2f}")
        _finish(fig, ax, title, "chosen − rejected answer tokens", "reward margin (β·nats)")
    for ax in axes[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_sample_lengths(trials: list[TrialRecords]) -> Figure:
    """Mean token length of the policy's samples (solid) and the reference's (dashed) at each
    evaluation (``--sample-prompts``): a policy that drifts into verbosity pulls away upwards."""
    fig = Figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot()
    for i, t in enumerate(trials):
        if t.sample_lengths:
            steps = [r["step"] for r in t.sample_lengths]
            ax.plot(steps, [r["samples/policy_tokens"] for r in t.sample_lengths], color=color(i), marker="o",
                    markersize=3, label=f"{_label(t)}: policy")
            ax.plot(steps, [r["samples/reference_tokens"] for r in t.sample_lengths], color=color(i),
                    linestyle="--", linewidth=1, label=f"{_label(t)}: reference")
    ax.set_ylim(bottom=0)
    _finish(fig, ax, "Verbosity drift: mean length of samples", "optimizer step", "mean answer length (tokens)")
    fig.tight_layout()
    return fig


# What each chart shows: under it in report.html and on the web app's experiments page.
CAPTIONS = {
    "loss.png": "Training loss vs optimizer step, every configuration.",
    "eval_loss.png": "Final eval loss per configuration (best outlined) and eval loss over training.",
    "rewards.png": "Reward margin and reward accuracy on held-out pairs at each evaluation.",
    "system.png": "System: GPU power when a GPU was present, else process CPU use.",
    "length_scatter.png": "Reward margin against the answers' token-length difference (chosen − rejected) on "
                          "each trial's held-out pairs at its final evaluation, with the least-squares line.",
    "sample_lengths.png": "Verbosity drift: mean token length of the policy's samples (solid) and the "
                          "reference's (dashed) on the same held-out prompts at each evaluation.",
}

CHARTS = {
    "loss.png": plot_train_loss,
    "eval_loss.png": plot_eval_loss,
    "rewards.png": plot_rewards,
    "system.png": plot_system,
}

# Charts drawn only when some trial recorded what they show: (plot, does this trial have it).
RECORDED_CHARTS = {
    "length_scatter.png": (plot_length_scatter, lambda t: bool(t.eval_pairs)),
    "sample_lengths.png": (plot_sample_lengths, lambda t: bool(t.sample_lengths)),
}
