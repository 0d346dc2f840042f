"""Each chart is a real, non-blank image of the right chart (checked on the figure
before saving), and the table rows match the records. Records are written through dpolab.runs
with distinctive values, so a report that reads the wrong field or trial fails."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from dpolab.config import TrainConfig
from dpolab.report import write_report
from dpolab.report.collect import collect
from dpolab.report.plots import (
    plot_eval_loss,
    plot_length_scatter,
    plot_rewards,
    plot_sample_lengths,
    plot_system,
    plot_train_loss,
)
from dpolab.runs import RunFolder, SweepFolder, write_json

TRIALS = {  # name: (learning rate, batch, weight decay, final eval loss, accuracy, margin)
    "lr5e-4-b6": (5e-4, 6, 0.01, 0.6613, 0.5938, 0.0712),
    "lr1e-3-b6": (1e-3, 6, 0.01, 0.6432, 0.6146, 0.1023),
    "lr5e-4-b8": (5e-4, 8, 0.005, 0.6755, 0.5521, 0.0418),
}


def make_trial(sweep: SweepFolder, index: int, name: str, values: tuple, gpu: bool) -> RunFolder:
    lr, batch, wd, loss, acc, margin = values
    run = RunFolder.create(sweep.trial_dir(name), {"engine": "dpolab", "base_model": "tiny-gpt2",
                                                   "dataset": "hh-rlhf-sample"})
    config = TrainConfig(learning_rate=lr, per_device_train_batch_size=batch, weight_decay=wd,
                         num_train_epochs=2, beta=0.1)
    run.config_path.write_text(yaml.safe_dump(config.to_dict()))
    for step in range(1, 41):
        run.append_metrics({"split": "train", "step": step, "epoch": step / 20, "time_s": step * 0.5,
                            "loss": 0.6931 - step * 0.001 * (index + 1)})
        if step % 10 == 0:
            run.append_metrics({"split": "eval", "step": step, "epoch": step / 20, "time_s": step * 0.5,
                                "loss": loss + (40 - step) * 0.001, "rewards/accuracies": acc - (40 - step) * 0.002,
                                "rewards/margins": margin * step / 40})
    for t in range(12):
        row = {"time_s": t * 2.0, "cpu_percent": 150.0 + 10 * index + t, "rss_mb": 800.0}
        if gpu:
            row["gpus"] = [{"index": 0, "power_w": 200.0 + 5 * t + index, "energy_j": 100.0 * t,
                            "util_percent": 90, "mem_mb": 3000.0}]
        run.append_system(row)
    run.write_summary({"train": {"loss": 0.67, "steps": 40, "epochs": 2.0},
                       "eval": {"step": 40, "loss": loss, "rewards/accuracies": acc, "rewards/margins": margin},
                       "wall_time_s": 61.5 + index, "pairs_per_s": 10.5 + index, "reference_cache": "hit"})
    write_json(run.path / "trial.json", {"trial": name, "optuna_trial": index, "state": "complete",
                                         "value": loss, "error": None, "overrides": {}})
    return run


def make_sweep(root, gpu: bool = False) -> SweepFolder:
    sweep = SweepFolder.create(root / "sweep", {"mode": "grid", "objective": "eval/loss", "direction": "minimize",
                                                "reference": [{"reference_cache": "miss", "reference_time_s": 4.2}]})
    for i, (name, values) in enumerate(TRIALS.items()):
        make_trial(sweep, i, name, values, gpu)
    # A trial that failed before training wrote anything but its status.
    sweep.trial_dir("broken").mkdir()
    write_json(sweep.trial_dir("broken") / "trial.json", {
        "trial": "broken", "optuna_trial": 3, "state": "fail", "value": None,
        "error": "ConfigError: beta must be > 0, got -1.0", "overrides": {"beta": -1.0}})
    sweep.write_best({"trial": "lr1e-3-b6", "run_dir": "trials/lr1e-3-b6", "model_dir": "trials/lr1e-3-b6/model",
                      "objective": "eval/loss", "value": 0.6432})
    return sweep


def check_labels(ax) -> None:
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_charts_draw_one_series_per_trial(tmp_path):
    data = collect(make_sweep(tmp_path).path)
    assert [t.name for t in data.trials] == [*TRIALS, "broken"]

    (ax,) = plot_train_loss(data.trials).axes
    check_labels(ax)
    assert len(ax.get_lines()) == 3 and ax.get_legend() is not None
    assert {line.get_label() for line in ax.get_lines()} == {"lr5e-4-b6", "lr1e-3-b6 (best)", "lr5e-4-b8"}
    assert np.allclose(ax.get_lines()[1].get_ydata()[:2], [0.6931 - 0.002, 0.6931 - 0.004])

    bars_ax, lines_ax = plot_eval_loss(data.trials).axes
    check_labels(bars_ax)
    check_labels(lines_ax)
    assert [round(p.get_height(), 4) for p in bars_ax.patches] == [v[3] for v in TRIALS.values()]
    assert len(lines_ax.get_lines()) == 3

    margin_ax, acc_ax = plot_rewards(data.trials).axes
    for ax in (margin_ax, acc_ax):
        check_labels(ax)
        assert len([line for line in ax.get_lines() if not line.get_label().startswith("_")]) == 3
    assert "margin" in margin_ax.get_title().lower() and "accuracy" in acc_ax.get_title().lower()

    (ax,) = plot_system(data.trials).axes
    assert "CPU" in ax.get_title() and "%" in ax.get_ylabel() and len(ax.get_lines()) == 3

    gpu_data = collect(make_sweep(tmp_path / "gpu", gpu=True).path)
    (ax,) = plot_system(gpu_data.trials).axes
    assert "GPU power" in ax.get_title() and "(W)" in ax.get_ylabel()
    assert ax.get_lines()[0].get_ydata()[0] == 200.0


def test_report_files_images_and_table_match_records(tmp_path):
    sweep = make_sweep(tmp_path)
    report = write_report(sweep.path)
    assert report == sweep.report_dir / "report.html"

    images = {}
    for name in ("loss.png", "eval_loss.png", "rewards.png", "system.png", "table.png"):
        pixels = imread(sweep.report_dir / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 500, name
        assert pixels[..., :3].std() > 0.05, f"{name} is blank"
        images[name] = pixels
    assert not np.array_equal(images["loss.png"], images["rewards.png"])

    # Markdown table: one row per trial, values from summary.json / config.yaml, best row marked.
    lines = (sweep.report_dir / "table.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            continue
        cells = [c.strip().strip("*") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows[cells[0].removeprefix("★ ")] = dict(zip(header, cells, strict=True))
    assert list(rows) == [*TRIALS, "broken"]
    for i, (name, (lr, batch, wd, loss, acc, margin)) in enumerate(TRIALS.items()):
        row = rows[name]
        assert row["eval loss"] == f"{loss:.4f}" and row["reward acc."] == f"{acc:.3f}"
        assert row["reward margin"] == f"{margin:.4f}" and row["batch"] == str(batch)
        assert float(row["lr"]) == lr and float(row["weight decay"]) == wd and row["epochs"] == "2"
        assert row["wall time (s)"] == f"{61.5 + i:.1f}" and row["pairs/s"] == f"{10.5 + i:.2f}"
        assert row["beta"] == "0.1" and row["loss type"] == "sigmoid"
    assert [line for line in lines if "★" in line and "|" in line][0].startswith("| **★ lr1e-3-b6**")
    assert rows["broken"]["status"].startswith("fail: ConfigError") and rows["broken"]["beta"] == "-1"

    html_table = (sweep.report_dir / "table.html").read_text()
    assert html_table.count("<tr") == 1 + 4 and html_table.count('class="best"') == 1

    page = report.read_text()
    assert page.count("data:image/png;base64,") == 5
    assert not re.search(r'(src|href)="(?!data:)', page), "report.html must not load external files"
    assert "lr1e-3-b6" in page and "0.6432" in page


def test_single_run_report_and_cli(tmp_path, capsys):
    import argparse

    from dpolab.report import cli

    parser = argparse.ArgumentParser(prog="dpolab")
    cli.register(parser.add_subparsers())
    sweep = make_sweep(tmp_path)
    run_dir = sweep.trial_dir("lr5e-4-b8")
    args = parser.parse_args(["report", str(run_dir)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "report:" in out and "0.6755" in out
    table = (run_dir / "report" / "table.md").read_text()
    assert table.count("| ★ ") + table.count("| **★ ") == 1 and "lr5e-4-b8" in table
    assert (run_dir / "report" / "report.html").is_file()
    with pytest.raises(Exception, match="not a dpolab run or sweep"):
        write_report(tmp_path)


def add_length_records(run: RunFolder, slope: float) -> list[dict]:
    """What a DPO trial records for the length-controlled evaluation: per-pair margins and lengths,
    the final eval's length metrics (computed from them) and samples with token counts."""
    import torch

    from dpolab.scoring.length import length_metrics, pair_records

    chosen = torch.tensor([30, 12, 25, 8, 40, 16, 22, 19])
    rejected = torch.tensor([10, 20, 25, 30, 12, 14, 28, 15])
    margins = slope * (chosen - rejected).double() + torch.tensor([0.3, -0.2, 0.1, 0.2, -0.1, 0.4, -0.3, 0.05])
    lengths = {"chosen_tokens": chosen, "rejected_tokens": rejected, "chosen_chars": chosen * 4,
               "rejected_chars": rejected * 4}
    run.write_eval_pairs(pair_records(margins, lengths))
    summary = run.summary()
    summary["eval"].update(length_metrics(margins, **lengths))
    run.write_summary({k: v for k, v in summary.items() if k != "format"})
    for step, policy in ((20, 10), (40, 18)):
        run.append_samples([{"step": step, "index": i, "prompt": "p", "policy": "a", "reference": "b", "reward": 0.1,
                             "policy_tokens": policy + i, "reference_tokens": 9} for i in range(2)])
    return summary["eval"]


def test_length_table_scatter_and_verbosity_drift(tmp_path):
    sweep = make_sweep(tmp_path)
    evals = {name: add_length_records(sweep.trial_run(name), slope)
             for name, slope in (("lr5e-4-b6", 0.1), ("lr1e-3-b6", -0.05))}
    data = collect(sweep.path)

    scatter = plot_length_scatter(data.trials)
    drawn = [ax for ax in scatter.axes if ax.collections]
    assert len(drawn) == 2
    for ax, name in zip(drawn, evals, strict=True):
        check_labels(ax)
        records = sweep.trial_run(name).eval_pairs()
        assert np.allclose(ax.collections[0].get_offsets(),
                           [[r["chosen_tokens"] - r["rejected_tokens"], r["margin"]] for r in records])
        assert f"{evals[name]['length/margin_spearman']:+.2f}" in ax.get_title()
    (ax,) = plot_sample_lengths(data.trials).axes
    check_labels(ax)
    policy_line = next(line for line in ax.get_lines() if line.get_label() == "lr5e-4-b6: policy")
    assert list(policy_line.get_xdata()) == [20, 40] and list(policy_line.get_ydata()) == [10.5, 18.5]

    report = write_report(sweep.path)
    table = (sweep.report_dir / "length_table.md").read_text()
    row = next(line for line in table.splitlines() if "lr5e-4-b6" in line)
    ev = evals["lr5e-4-b6"]
    expected = (f"{ev['rewards/accuracies_length_balanced']:.3f} [{ev['rewards/accuracies_length_balanced_ci_low']:.2f}, "
                f"{ev['rewards/accuracies_length_balanced_ci_high']:.2f}]")
    assert expected in row and f"{ev['length/chosen_longer']:.3f}" in row
    assert "lr5e-4-b8" not in table  # recorded no length metrics
    page = report.read_text()
    assert "Length-controlled evaluation" in page and page.count("data:image/png;base64,") == 7
    assert (sweep.report_dir / "length_scatter.png").is_file() and (sweep.report_dir / "sample_lengths.png").is_file()
