"""``dpolab evaluate RUN_OR_SWEEP``."""

from __future__ import annotations

import argparse

from dpolab.hh import SAMPLING
from dpolab.paths import dataset_path_or_name, path_or_name, user_path
from dpolab.train_options import LOSS_FIELDS, loss_options

# Options that only mean something with --dataset (scoring any model on a data set). Their defaults
# are None so that one given without --dataset can be refused; the real defaults are evaluate_model's.
DATASET_OPTIONS = ("reference", "split", "data_format", "columns")


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "evaluate", help="held-out metrics and generation eval of a trained run", parents=[loss_options()],
        description="Score a run (or a sweep's best trial) on its held-out pairs (eval loss, reward "
        "accuracy and margin, log-probs of policy vs reference), generate answers of policy and reference "
        "for N held-out prompts (seeded sampling, saved side by side), and with --judge compute win rates "
        "with 95% intervals. Output: <run>/evaluation/. The loss options (--loss-type, --beta, ...) "
        "default to the run's own (with --dataset: to train's defaults).")
    ev.add_argument("path", type=path_or_name, metavar="RUN_OR_SWEEP", help="a run folder or a sweep folder (its "
                    "best trial); with --dataset, any model: folder, run, export or Hub id")
    ev.add_argument("--dataset", type=dataset_path_or_name, metavar="SOURCE", help="score PATH against --reference on every "
                    "pair of SOURCE (any source and format `dpolab train` reads); writes OUTPUT_DIR/metrics.json")
    ev.add_argument("--reference", type=path_or_name, metavar="MODEL", help="the reference model (with --dataset; "
                    "not needed by a reference-free --loss-type such as simpo)")
    ev.add_argument("--split", help="split of a Hub / save_to_disk --dataset (default train)")
    ev.add_argument("--data-format", help="force the row format (with --dataset; default auto)")
    ev.add_argument("--columns", help="column mapping prompt=COL,chosen=COL,rejected=COL (with --dataset)")
    ev.add_argument("--n-prompts", type=int, default=16, help="held-out prompts to answer (default 16)")
    ev.add_argument("--judge", type=path_or_name, metavar="MODEL", help="reward model (Hub id or folder) for win rates")
    ev.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed + i)")
    ev.add_argument("--max-new-tokens", type=int, default=64, help="length limit of each answer (default 64)")
    ev.add_argument("--temperature", type=float, default=SAMPLING["temperature"],
                    help=f"sampling temperature, > 0 (default {SAMPLING['temperature']})")
    ev.add_argument("--top-p", type=float, default=SAMPLING["top_p"],
                    help=f"nucleus sampling mass, in (0, 1] (default {SAMPLING['top_p']})")
    ev.add_argument("--output-dir", type=user_path, help="default: <run>/evaluation")
    ev.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from dpolab.errors import ConfigError
    from dpolab.evaluate.run import evaluate

    if args.dataset:
        return _evaluate_model(args)
    given = [name for name in DATASET_OPTIONS if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} goes with --dataset SOURCE (scoring a model on a "
                          "data set); without --dataset the run's own held-out pairs and reference are used")
    check_sampling(args)
    result = evaluate(args.path, n_prompts=args.n_prompts, judge=args.judge, seed=args.seed,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      output_dir=args.output_dir, loss_overrides=_loss_overrides(args))
    p = result["pairs"]
    print(f"held-out pairs ({p['pairs']}): eval loss {p['loss']:.4f} | reward accuracy {p['rewards/accuracies']:.3f} "
          f"| reward margin {p['rewards/margins']:.4f}")
    print(length_line(p))
    if "logps/ref_chosen" in p:  # a reference-free loss scores no reference
        print(f"log-probs chosen: policy {p['logps/chosen']:.2f} vs reference {p['logps/ref_chosen']:.2f}; "
              f"rejected: policy {p['logps/rejected']:.2f} vs reference {p['logps/ref_rejected']:.2f}")
    print(f"generations: {result['generation']['n_prompts']} prompts")
    if result["judge"]:
        for key, label in (("vs_reference", "reference"), ("vs_chosen", "dataset's chosen answer")):
            w = result["judge"][key]
            print(f"win rate over {label}: {w['win_rate']:.3f} (95% CI {w['ci95'][0]:.3f}-{w['ci95'][1]:.3f}, n={w['n']})")
    return 0


def _loss_overrides(args: argparse.Namespace) -> dict:
    """The loss options given on the command line (argparse-typed)."""
    return {name: getattr(args, name) for name in LOSS_FIELDS if hasattr(args, name)}


def check_sampling(args: argparse.Namespace) -> None:
    """One line naming the option, before any model is loaded (``generate`` would raise a ValueError)."""
    from dpolab.errors import ConfigError

    if args.n_prompts < 0:
        raise ConfigError(f"--n-prompts must be >= 0, got {args.n_prompts}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature must be > 0 (answers are sampled), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")


def _evaluate_model(args: argparse.Namespace) -> int:
    from dpolab.evaluate.run import evaluate_model

    options = {name: getattr(args, name) for name in DATASET_OPTIONS[1:] if getattr(args, name) is not None}
    result = evaluate_model(args.path, args.reference, args.dataset, output_dir=args.output_dir or "evaluation",
                            **options, **_loss_overrides(args))
    p = result["pairs"]
    print(f"{args.dataset} ({p['pairs']} pairs): loss {p['loss']:.4f} | reward accuracy {p['rewards/accuracies']:.3f} "
          f"| reward margin {p['rewards/margins']:.4f}")
    print(length_line(p))
    return 0


def length_line(metrics: dict) -> str:
    """The length-controlled numbers of a ``pairs`` block, for a reader (README: reading these numbers)."""
    def interval(name: str) -> str:
        if name not in metrics:
            return "n/a"
        if name + "_ci_low" not in metrics:
            return f"{metrics[name]:.3f}"
        return f"{metrics[name]:.3f} [{metrics[name + '_ci_low']:.3f}, {metrics[name + '_ci_high']:.3f}]"

    return (f"length-balanced reward accuracy {interval('rewards/accuracies_length_balanced')} | "
            f"length-only baseline {metrics['length/chosen_longer']:.3f} | "
            f"residual accuracy {interval('rewards/accuracies_length_residual')}")
