"""Training throughput: dpolab's engine vs TRL 1.16 DPOTrainer, same pairs, model, batch, optimizer.

    python benchmarks/train_throughput.py --models tiny-gpt2 gpt2-124m-random --repeats 3

Variants (each run in a fresh subprocess, run order rotated every round, medians reported):

* ``dpolab``      DpolabTrainer; the reference pass runs once before training (timed separately).
* ``trl_default`` TRL's DPOConfig defaults as a user gets them: gradient checkpointing on,
                  bf16=True (on CPU: bf16 autocast), reference model scored at every step.
* ``trl_tuned``   TRL with precompute_ref_log_probs=True, gradient checkpointing off, fp32; its
                  precompute pass (in DPOTrainer.__init__) is timed separately like ours.

All variants train on the same prepared pairs (``dpolab.data.prepare_data``, max_length 512) in the
same order (random sampler, same seed, group_by_length off). The first ``--warmup`` steps are
excluded; pairs/s and tokens/s (attended tokens, chosen + rejected) cover the measured steps only.
Peak RSS is the worker process's peak over the whole run (model load, reference pass, training).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine_info, peak_rss_mb, publish, rotated, run_worker, summarize

logger = logging.getLogger("train_throughput")

VARIANTS = ["dpolab", "trl_default", "trl_tuned"]
# Not run by default: dpolab with GPT-2's stock Python GELU, to show what the fused GELU buys.
EXTRA_VARIANTS = ["dpolab_python_gelu"]
DEFAULT_STEPS = {"tiny-gpt2": 6, "gpt2-124m-random": 4}
DEFAULT_BATCH = {"tiny-gpt2": 4, "gpt2-124m-random": 2}


# ---------------------------------------------------------------------------------------------
# One measured run (worker process)
# ---------------------------------------------------------------------------------------------

class StepTimer:
    """TrainerCallback timing optimizer steps after the warm-up ones; reads the trainer's counters."""

    def __init__(self, warmup: int) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                timer.mark(state.global_step)

        self.callback = _Callback()
        self.warmup = warmup
        self.trainer: Any = None
        self.marks: list[tuple[int, float, int, int]] = []  # (step, time, pairs_seen, tokens_seen)

    def mark(self, step: int) -> None:
        self.marks.append((step, time.perf_counter(), self.trainer.pairs_seen, self.trainer.tokens_seen))

    def measured(self) -> dict[str, Any]:
        start = next(m for m in self.marks if m[0] == self.warmup)
        end = self.marks[-1]
        seconds = end[1] - start[1]
        pairs, tokens = end[2] - start[2], end[3] - start[3]
        step_s = [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return {"measured_steps": end[0] - start[0], "measured_s": seconds, "pairs": pairs, "tokens": tokens,
                "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds,
                "step_s": [round(s, 4) for s in step_s]}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dpolab.config import TrainConfig
    from dpolab.data import prepare_data
    from dpolab.model import disable_dropout, load_model, load_tokenizer, use_fused_gelu

    if args.threads:
        torch.set_num_threads(args.threads)
    batch, steps, warmup = args.batch, args.steps, args.warmup
    cache = Path(tempfile.mkdtemp(prefix="dpolab-bench-cache-"))  # fresh: no reference cache hits, ours or TRL's
    config = TrainConfig(model=args.model, max_length=args.max_length, max_prompt_length=args.max_length // 2,
                         per_device_train_batch_size=batch, max_train_pairs=(steps + warmup) * batch,
                         max_eval_pairs=1, group_by_length=False, seed=0, learning_rate=5e-5,
                         max_steps=steps + warmup, dtype="fp32", device="cpu", cache_dir=str(cache))
    tokenizer = load_tokenizer(config.model)
    train_set = prepare_data(config, tokenizer)[0]["train"]
    model = load_model(config.model)
    disable_dropout(model)
    timer = StepTimer(warmup)
    common_args = dict(output_dir=str(cache / "out"), per_device_train_batch_size=batch, max_steps=steps + warmup,
                       learning_rate=config.learning_rate, seed=0, data_seed=0, report_to="none",
                       save_strategy="no", eval_strategy="no", logging_steps=10_000, use_cpu=True,
                       remove_unused_columns=False, train_sampling_strategy="random", dataloader_num_workers=0,
                       disable_tqdm=True)
    result: dict[str, Any] = {"variant": args.variant, "model": args.model, "batch": batch, "steps": steps,
                              "warmup": warmup, "max_length": args.max_length, "threads": torch.get_num_threads()}
    if args.variant.startswith("dpolab"):
        if args.variant == "dpolab":
            use_fused_gelu(model)  # as dpolab.dpo.trainer.load_prepared does
        from transformers import TrainingArguments

        from dpolab.dpo.logps import PreferenceCollator
        from dpolab.dpo.reference import score_pairs
        from dpolab.dpo.trainer import DpolabTrainer

        start = time.perf_counter()
        ref_chosen, ref_rejected = score_pairs(
            model, train_set, tokenizer.pad_token_id, config.per_device_eval_batch_size, config.logps_chunk_size)
        result["reference_s"] = time.perf_counter() - start
        train_set = train_set.add_column("ref_chosen_logps", ref_chosen.tolist()).add_column(
            "ref_rejected_logps", ref_rejected.tolist())
        trainer = DpolabTrainer(model=model, args=TrainingArguments(**common_args), train_dataset=train_set,
                            data_collator=PreferenceCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                            callbacks=[timer.callback], dpo_config=config)
    else:
        from trl import DPOConfig

        from dpolab.dpo.trl_engine import pretokenized_trainer_class

        if args.variant == "trl_default":
            dpo_args = DPOConfig(**common_args, max_length=args.max_length)  # gradient checkpointing, bf16: defaults
            reference = copy.deepcopy(model)  # a Hub model would get the same second copy from TRL itself
        else:
            dpo_args = DPOConfig(**common_args, max_length=args.max_length, precompute_ref_log_probs=True,
                                 gradient_checkpointing=False, bf16=False)
            reference = None
        start = time.perf_counter()
        trainer = pretokenized_trainer_class()(model=model, ref_model=reference, args=dpo_args,
                                               train_dataset=train_set, processing_class=tokenizer,
                                               callbacks=[timer.callback])
        if args.variant == "trl_tuned":
            result["reference_s"] = time.perf_counter() - start  # the precompute pass is most of __init__
        result.update(gradient_checkpointing=dpo_args.gradient_checkpointing, bf16=dpo_args.bf16)
    result["autocast_cpu"] = _probe_autocast(trainer)
    timer.trainer = trainer
    trainer.train()
    result.update(timer.measured())
    result["reference_pairs"] = len(train_set)
    if "reference_s" in result:
        # One epoch scores each pair once with the reference: add that cost per trained pair.
        per_pair = result["reference_s"] / len(train_set)
        result["amortised_pairs_per_s"] = 1 / (1 / result["pairs_per_s"] + per_pair)
    else:
        result["amortised_pairs_per_s"] = result["pairs_per_s"]  # reference already inside every step
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _probe_autocast(trainer) -> str | None:
    """What bf16=True does on CPU: the dtype Trainer's autocast context enables, or None."""
    import torch

    with trainer.compute_loss_context_manager():
        enabled = torch.is_autocast_enabled("cpu")
        return str(torch.get_autocast_dtype("cpu")) if enabled else None


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------

def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    script = Path(__file__).resolve()
    runs: list[dict[str, Any]] = []
    info = machine_info()
    plan = [(model, rnd, variant) for model in args.models for rnd in range(args.repeats)
            for variant in rotated(args.variants, rnd)]
    for model, rnd, variant in tqdm(plan, desc="runs", unit="run"):
        steps = args.steps or DEFAULT_STEPS.get(model, 10)
        batch = args.batch or DEFAULT_BATCH.get(model, 2)
        worker_args = ["--variant", variant, "--model", model, "--steps", str(steps), "--warmup", str(args.warmup),
                       "--batch", str(batch), "--max-length", str(args.max_length)]
        if args.threads:
            worker_args += ["--threads", str(args.threads)]
        result = run_worker(script, worker_args)
        result["round"] = rnd
        runs.append(result)
        if args.partial:  # keep what is done if a long benchmark is stopped early
            publish("train_throughput", {"partial": True, "machine": info, "runs": runs}, args.partial)
        logger.info("%s %s round %d: %.3f pairs/s, %.0f tokens/s, peak %.0f MB", model, variant, rnd,
                    result["pairs_per_s"], result["tokens_per_s"], result["peak_rss_mb"])
    info["load_avg_after"] = machine_info()["load_avg_1_5_15"]
    return {"benchmark": "train_throughput", "command": " ".join(sys.argv), "machine": info,
            "summary": summarise_runs(runs), "runs": runs}


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and variant: median/min/max of each figure; per model: ratios of medians."""
    keys = ("pairs_per_s", "tokens_per_s", "amortised_pairs_per_s", "peak_rss_mb", "reference_s")
    summary: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        per_variant = {}
        for variant in dict.fromkeys(r["variant"] for r in runs if r["model"] == model):
            rows = [r for r in runs if r["model"] == model and r["variant"] == variant]
            per_variant[variant] = {k: summarize([r[k] for r in rows]) for k in keys if k in rows[0]}
        ratios = {}
        ours = per_variant.get("dpolab")
        for other in ("trl_default", "trl_tuned"):
            if ours and other in per_variant:
                theirs = per_variant[other]
                ratios[f"dpolab_vs_{other}"] = {
                    "pairs_per_s": ours["pairs_per_s"]["median"] / theirs["pairs_per_s"]["median"],
                    "amortised_pairs_per_s": (ours["amortised_pairs_per_s"]["median"]
                                              / theirs["amortised_pairs_per_s"]["median"]),
                    "peak_rss": ours["peak_rss_mb"]["median"] / theirs["peak_rss_mb"]["median"],
                }
        summary[model] = {"variants": per_variant, "ratios": ratios}
    return summary


def markdown_table(data: dict[str, Any]) -> str:
    lines = ["| model | variant | pairs/s (min-max) | tokens/s | amortised pairs/s | reference pass s "
             "| peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for model, entry in data["summary"].items():
        for variant, s in entry["variants"].items():
            ref = f"{s['reference_s']['median']:.1f}" if "reference_s" in s else "in every step"
            lines.append(
                f"| {model} | {variant} | {s['pairs_per_s']['median']:.2f} ({s['pairs_per_s']['min']:.2f}-"
                f"{s['pairs_per_s']['max']:.2f}) | {s['tokens_per_s']['median']:.0f} | "
                f"{s['amortised_pairs_per_s']['median']:.2f} | {ref} | {s['peak_rss_mb']['median']:.0f} |")
    lines += ["", "| model | ratio | pairs/s | amortised pairs/s | peak RSS |", "|---|---|---|---|---|"]
    for model, entry in data["summary"].items():
        for name, r in entry["ratios"].items():
            lines.append(f"| {model} | {name} | {r['pairs_per_s']:.2f}x | {r['amortised_pairs_per_s']:.2f}x | "
                         f"{r['peak_rss']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-gpt2", "gpt2-124m-random"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS + EXTRA_VARIANTS)
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant and model (medians reported)")
    parser.add_argument("--steps", type=int, default=None, help="measured optimizer steps (default per model)")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps excluded from the timing")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: 4 tiny, 2 for 124M)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--partial", type=Path, default=None, help="rewrite this JSON after every run")
    # worker mode (one run; used by the orchestrator)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS + EXTRA_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if not args.worker else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.worker:
        args.out.write_text(json.dumps(worker(args)))
        return 0
    data = run_all(args)
    publish("train_throughput", data, args.out, markdown_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
