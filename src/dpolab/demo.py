"""``dpolab demo`` (what ``make demo`` runs): the whole pipeline on the embedded default, offline.

The standard recipe: SFT of tiny-gpt2 on the chosen answers of the bundled real HH-RLHF sample,
then three DPO configurations from that SFT model (the default sweep's 3-row table of learning
rate, batch size and weight decay, shrunk for a CPU) with one shared reference pass (the SFT model), best trial picked by held-out eval loss,
then the report with both stages. Re-running resumes: finished runs and trials are skipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dpolab.paths import user_path
from dpolab.runs import RunFolder

DEFAULT_CONFIG = Path("configs/sweep-demo.yaml")
DEFAULT_SFT_CONFIG = Path("configs/sft-demo.yaml")


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the whole pipeline on the bundled sample (CPU, minutes)",
        description="SFT of tiny-gpt2 on the bundled HH-RLHF sample's chosen answers, then sweep three DPO "
        "configurations from it, pick the best by held-out eval loss, and write the report.")
    demo.add_argument("--config", type=user_path, default=str(DEFAULT_CONFIG), help="sweep YAML (default: %(default)s)")
    demo.add_argument("--output-dir", type=user_path, default="runs/demo", help="sweep folder (default: %(default)s)")
    demo.add_argument("--sft-config", type=user_path, default=str(DEFAULT_SFT_CONFIG),
                      help="stage 1: the SFT config the DPO sweep starts from (default: %(default)s); 'none' skips SFT")
    demo.set_defaults(func=run_demo)


def sft_stage(config_path: Path, run_dir: Path) -> RunFolder:
    """The demo's SFT run: trained once (a re-run reuses it, or resumes an interrupted one)."""
    from dpolab.config import load_config
    from dpolab.errors import ConfigError
    from dpolab.sft.trainer import train_sft

    if not config_path.is_file():
        raise ConfigError(f"{config_path}: SFT config not found (pass --sft-config, or --sft-config none)")
    # A finished SFT run is resumed as it is (untouched); an interrupted one continues.
    run = train_sft(load_config(config_path, {"stage": "sft"}), run_dir, resume=RunFolder.is_run(run_dir))
    print(f"stage 1, SFT: held-out answer NLL {run.summary()['eval']['loss']:.4f} ({run.path})")
    return run


def run_demo(args: argparse.Namespace) -> int:
    from dpolab.errors import ConfigError
    from dpolab.evaluate.cli import length_line
    from dpolab.report import write_report
    from dpolab.sweep.cli import print_sweep_result
    from dpolab.sweep.config import load_sweep_config
    from dpolab.sweep.runner import run_sweep

    if not Path(args.config).is_file():
        raise ConfigError(f"{args.config}: demo config not found (run from the repository root, or pass --config)")
    start = time.perf_counter()
    sweep_config = load_sweep_config(args.config)
    if args.sft_config.name != "none":
        # Stage 1: SFT inside the sweep folder; every DPO trial starts from it and uses it as reference.
        sweep_config.base["model"] = str(sft_stage(args.sft_config, Path(args.output_dir) / "sft").path)
    sweep = run_sweep(sweep_config, args.output_dir)
    report = write_report(sweep.path)
    print_sweep_result(sweep)
    best_eval = sweep.best_run().summary()["eval"]
    baseline = best_eval.get("length/chosen_longer")
    print(f"\nheld-out pairs, best trial: eval loss {best_eval['loss']:.4f} | "
          f"reward accuracy {best_eval['rewards/accuracies']:.3f}"
          + ("" if baseline is None else f" (length-only baseline {baseline:.3f})")
          + f" | reward margin {best_eval['rewards/margins']:.4f}")
    if baseline is not None:
        print(length_line(best_eval))
    print("\n" + (report.parent / "table.md").read_text())
    if (report.parent / "length_table.md").is_file():
        print("Length-controlled evaluation (held-out pairs):\n" + (report.parent / "length_table.md").read_text())
    print(f"report:      {report}")
    print(f"demo took {time.perf_counter() - start:.0f} s. Next:\n"
          f"  dpolab serve {sweep.path}                  # chat with the best model in the browser\n"
          f"  dpolab export {sweep.path} exports/demo     # HF folder + model card, ready to push")
    return 0
