"""``dpolab sweep``: run (or join, or resume) a grid or TPE study from a sweep YAML."""

from __future__ import annotations

import argparse

from dpolab.paths import resolve_config_paths, user_path
from dpolab.train_options import LOSS_FIELDS, loss_options


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser(
        "sweep", help="hyper-parameter sweep (grid or Optuna TPE search)", parents=[loss_options()],
        description="Run a sweep from configs/sweep-*.yaml. Re-running the same command resumes it "
        "(finished trials are skipped, interrupted ones rerun). Several workers, on several machines, "
        "share one study with --storage postgresql://...: create it once with --create-only, then "
        "start the workers with the same command without it. The loss options (--loss-type, --beta, "
        "...) set the sweep's base; a trial, grid or search space naming the field still wins.")
    sweep.add_argument("--config", type=user_path, help="sweep YAML (default: a 3-row table of learning rate, batch size and weight decay)")
    sweep.add_argument("--output-dir", type=user_path, help="sweep folder (default: runs/<config name or 'sweep'>)")
    sweep.add_argument("--storage", help="Optuna RDB URL shared by workers (default: sqlite file study.db "
                       "in the sweep folder)")
    sweep.add_argument("--create-only", action="store_true",
                       help="create the study, queue the grid and fill the caches, then exit")
    sweep.add_argument("--max-trials", type=int, help="stop this worker after this many trials")
    sweep.add_argument("--n-trials", type=int, help="search mode: trial budget of the whole study")
    sweep.add_argument("--report-to", help="trackers for every trial, comma-separated: "
                       "wandb,mlflow,tensorboard,trackio")
    sweep.add_argument("--report", action="store_true", help="write the sweep report when done")
    sweep.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    from dpolab.sweep.config import load_sweep_config
    from dpolab.sweep.runner import prepare_sweep, run_sweep

    overrides = {"n_trials": args.n_trials} if args.n_trials else {}
    config = load_sweep_config(args.config, overrides)
    config.base = resolve_config_paths({**config.base, **{k: getattr(args, k) for k in LOSS_FIELDS if hasattr(args, k)}})
    config.trials = [resolve_config_paths(trial) for trial in config.trials]
    output_dir = args.output_dir or user_path(f"runs/{args.config.stem if args.config else 'sweep'}")
    if args.create_only:
        if args.report_to is not None:
            config.base = {**config.base, "report_to": args.report_to}
        sweep = prepare_sweep(config, output_dir, args.storage)
        print(f"study ready: {sweep.path} ({sweep.info()['storage']}); start workers with the same "
              "command without --create-only")
        return 0
    report_to = [t for t in args.report_to.split(",") if t] if args.report_to is not None else None
    sweep = run_sweep(config, output_dir, args.storage, max_trials=args.max_trials, report_to=report_to)
    print_sweep_result(sweep)
    if args.report:
        from dpolab.report import write_report

        print(f"report:      {write_report(sweep.path)}")
    return 0


def print_sweep_result(sweep) -> None:
    print(f"\nsweep folder: {sweep.path}")
    for row in sweep.trial_records():
        value = f"{row['value']:.4f}" if row.get("value") is not None else "-"
        run = sweep.trial_run(row["trial"])
        dtype = run.resolved().get("dtype", "-") if run.identity_path.is_file() else "-"
        print(f"  {row['trial']:<24} {row['state']:<9} {value:>8}  {dtype:<5} {row.get('error') or ''}")
    if sweep.has_best():
        best = sweep.best()
        print(f"best:        {best['trial']} ({best['objective']} = {best['value']:.4f})")
        print(f"best model:  {sweep.path / best['model_dir']}")
