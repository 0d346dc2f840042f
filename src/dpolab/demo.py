"""``dpolab demo`` (what ``make demo`` runs): the whole pipeline on the embedded default, offline.

Three tiny-gpt2 configurations on the bundled real HH-RLHF sample (the original project's
3-row study, shrunk for a CPU), one shared reference pass, best trial picked by held-out eval
loss, then the report. Re-running resumes: finished trials are skipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dpolab.paths import user_path

DEFAULT_CONFIG = Path("configs/sweep-demo.yaml")


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the whole pipeline on the bundled sample (CPU, minutes)",
        description="Sweep three tiny-gpt2 DPO configurations on the bundled HH-RLHF sample, pick the "
        "best by held-out eval loss, and write the report.")
    demo.add_argument("--config", type=user_path, default=str(DEFAULT_CONFIG), help="sweep YAML (default: %(default)s)")
    demo.add_argument("--output-dir", type=user_path, default="runs/demo", help="sweep folder (default: %(default)s)")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from dpolab.errors import ConfigError
    from dpolab.report import write_report
    from dpolab.sweep.cli import print_sweep_result
    from dpolab.sweep.config import load_sweep_config
    from dpolab.sweep.runner import run_sweep

    if not Path(args.config).is_file():
        raise ConfigError(f"{args.config}: demo config not found (run from the repository root, or pass --config)")
    start = time.perf_counter()
    sweep = run_sweep(load_sweep_config(args.config), args.output_dir)
    report = write_report(sweep.path)
    print_sweep_result(sweep)
    best_eval = sweep.best_run().summary()["eval"]
    print(f"\nheld-out pairs, best trial: eval loss {best_eval['loss']:.4f} | "
          f"reward accuracy {best_eval['rewards/accuracies']:.3f} | reward margin {best_eval['rewards/margins']:.4f}")
    print("\n" + (report.parent / "table.md").read_text())
    print(f"report:      {report}")
    print(f"demo took {time.perf_counter() - start:.0f} s. Next:\n"
          f"  dpolab serve {sweep.path}                  # chat with the best model in the browser\n"
          f"  dpolab export {sweep.path} exports/demo     # HF folder + model card, ready to push")
    return 0
