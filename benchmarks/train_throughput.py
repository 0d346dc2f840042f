"""Training throughput: dpolab's engine vs TRL 1.16 DPOTrainer, same pairs, model, batch, optimizer.

    python benchmarks/train_throughput.py --models tiny-gpt2 gpt2-124m-random --repeats 3

Variants (each run in a fresh subprocess, run order rotated every round, medians reported):

* ``dpolab``      DpolabTrainer as ``dpolab train`` runs it (``batch_layout: auto``: packed without
                  padding on CPU, padded on GPUs); the reference pass runs once before training
                  (timed separately).
* ``trl_default`` TRL's DPOConfig defaults as a user gets them: gradient checkpointing on,
                  bf16=True (on CPU: bf16 autocast), reference model scored at every step.
* ``trl_tuned``   TRL with precompute_ref_log_probs=True, gradient checkpointing off, fp32; its
                  precompute pass (in DPOTrainer.__init__) is timed separately like ours.

All variants train on the same prepared pairs (``dpolab.data.prepare_data``, max_length 512) in the
same order (random sampler, same seed, group_by_length off). The first ``--warmup`` steps are
excluded; pairs/s and tokens/s (attended tokens, chosen + rejected) cover the measured steps only.
Peak RSS is the worker process's peak over the whole run (model load, reference pass, training).

``--device cuda --dtype bf16`` measures a GPU (bf16 autocast for dpolab and TRL tuned; TRL defaults
keep DPOConfig's own bf16=True). dpolab variants set the process up as ``dpolab train`` does
(``dpolab.model.prepare_device``: no cuDNN attention); TRL variants keep torch's defaults, as a user
gets them, except the extra ``trl_tuned_no_cudnn``. Each GPU run also reports peak GPU memory
(``torch.cuda``), model FLOPs utilisation (:func:`common.training_flops_per_token` against :func:`common.gpu_peak_tflops`)
and, from the run's ``system.jsonl`` (dpolab's NVML sampler), mean GPU power and energy per pair.

Every invocation also measures the machine's matmul rate on GPT-2's shapes, fp32 and bf16, before
and after the runs (:func:`common.gemm_rates`), and reports each variant's model FLOP rate as a
share of the rate in the dtype its matmuls ran in (``gemm_share``): how close a step comes to
what this machine's GEMMs can do.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    cuda_sync,
    gemm_rates,
    gemm_share,
    gpu_peak_tflops,
    machine_info,
    peak_rss_mb,
    publish,
    rotated,
    run_worker,
    summarize,
    training_flops_per_token,
    write_results,
)

logger = logging.getLogger("train_throughput")

VARIANTS = ["dpolab", "trl_default", "trl_tuned"]
# Not run by default: dpolab with GPT-2's stock Python GELU, to show what the fused GELU buys, and
# dpolab with --dtype bf16 on CPU as plain autocast over fp32 weights (what bf16 did before bf16 weights),
# and dpolab in fp32 whatever --dtype says (to compare precisions inside one alternating invocation).
# trl_tuned_no_cudnn: TRL tuned with the attention setting dpolab makes on CUDA (no cuDNN SDPA, see
# dpolab.model.prepare_device), to show how much of the gap on a GPU that one setting is.
# dpolab_padded / dpolab_packed: dpolab with batch_layout forced (what packing buys on each device).
# dpolab_token_budget: dpolab with max_tokens_per_batch (--max-tokens-per-batch): with
# --gradient-accumulation-steps > 1, the optimizer batch's pairs in as few forwards as the budget allows.
# dpolab_compile: dpolab with compile: true (torch.compile, length buckets); --warmup must cover compiling.
EXTRA_VARIANTS = ["dpolab_python_gelu", "dpolab_autocast", "dpolab_fp32", "dpolab_padded", "dpolab_packed",
                  "dpolab_token_budget", "dpolab_compile", "trl_tuned_no_cudnn"]
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
        cuda_sync()  # the step's kernels are queued, not done, when the callback runs
        self.marks.append((step, time.monotonic(), self.trainer.pairs_seen, self.trainer.tokens_seen))

    def measured(self) -> dict[str, Any]:
        start = next(m for m in self.marks if m[0] == self.warmup)
        end = self.marks[-1]
        seconds = end[1] - start[1]
        pairs, tokens = end[2] - start[2], end[3] - start[3]
        step_s = [b[1] - a[1] for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return {"measured_steps": end[0] - start[0], "measured_s": seconds, "pairs": pairs, "tokens": tokens,
                "window_monotonic": [start[1], end[1]],
                "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds,
                "step_s": [round(s, 4) for s in step_s]}


class ProfileWindow:
    """TrainerCallback profiling the measured steps (after the warm-up ones), two ways.

    Writes ``profile_<variant>.txt``: torch.profiler's ops by self CPU time and, on a GPU, by self
    device time (where the kernels go), then cProfile's Python functions by cumulative time (where
    the host thread goes: on a GPU a step whose kernels are short is bound by this side).
    Profiling slows the steps, so a profiled run's pairs/s is not a throughput figure.
    """

    def __init__(self, warmup: int, path: Path, device: str) -> None:
        import cProfile

        from torch.profiler import ProfilerActivity, profile
        from transformers import TrainerCallback

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        torch_profiler, python_profiler = profile(activities=activities), cProfile.Profile()

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    torch_profiler.__enter__()
                    python_profiler.enable()

            def on_train_end(self, args, state, control, **kwargs):
                cuda_sync()
                python_profiler.disable()
                torch_profiler.__exit__(None, None, None)
                averages = torch_profiler.key_averages()
                tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30)]
                if device == "cuda":
                    tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=30))
                stream = io.StringIO()
                pstats.Stats(python_profiler, stream=stream).sort_stats("cumulative").print_stats(45)
                path.write_text("\n\n".join([*tables, stream.getvalue()]))

        self.callback = _Callback()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dpolab.allocator import cap_kernel_cache
    from dpolab.config import TrainConfig
    from dpolab.data import prepare_data
    from dpolab.model import disable_dropout, load_model, load_tokenizer, prepare_device, use_fused_gelu
    from dpolab.runs import RunFolder
    from dpolab.tracking import SystemSampler

    if args.threads:
        torch.set_num_threads(args.threads)
    batch, steps, warmup, device = args.batch, args.steps, args.warmup, args.device
    if device == "cpu" and args.variant.startswith("dpolab"):
        cap_kernel_cache()  # as dpolab.stage_setup.setup_stage does on CPU, before any bf16 matmul
    accumulation = args.gradient_accumulation_steps
    max_tokens = args.max_tokens_per_batch if args.variant == "dpolab_token_budget" else None
    if args.variant == "dpolab_fp32":
        args.dtype = "fp32"
    cache = Path(tempfile.mkdtemp(prefix="dpolab-bench-cache-"))  # fresh: no reference cache hits, ours or TRL's
    config = TrainConfig(model=args.model, max_length=args.max_length, max_prompt_length=args.max_length // 2,
                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         max_train_pairs=(steps + warmup) * batch * accumulation,
                         max_eval_pairs=1, group_by_length=False, seed=0, learning_rate=5e-5,
                         max_steps=steps + warmup, dtype=args.dtype, device=device, cache_dir=str(cache),
                         max_tokens_per_batch=max_tokens, compile=args.variant == "dpolab_compile")
    tokenizer = load_tokenizer(config.model)
    train_set = prepare_data(config, tokenizer)[0]["train"]
    model = load_model(config.model)
    disable_dropout(model)
    model.to(device)
    if args.variant.startswith("dpolab") or args.variant == "trl_tuned_no_cudnn":
        prepare_device(device)  # as dpolab's stage setup does: on CUDA, no cuDNN attention
    timer = StepTimer(warmup)
    callbacks = [timer.callback]
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
        callbacks.append(ProfileWindow(warmup, args.profile_dir / f"profile_{args.variant}.txt", device).callback)
    common_args = dict(output_dir=str(cache / "out"), per_device_train_batch_size=batch,
                       gradient_accumulation_steps=accumulation, max_steps=steps + warmup,
                       learning_rate=config.learning_rate, seed=0, data_seed=0, report_to="none",
                       save_strategy="no", eval_strategy="no", logging_steps=10_000, use_cpu=device == "cpu",
                       remove_unused_columns=False, train_sampling_strategy="random", dataloader_num_workers=0,
                       disable_tqdm=True)
    bf16 = args.dtype == "bf16"
    result: dict[str, Any] = {"variant": args.variant, "model": args.model, "batch": batch,
                              "gradient_accumulation_steps": accumulation, "max_tokens_per_batch": max_tokens,
                              "steps": steps,
                              "warmup": warmup, "max_length": args.max_length, "threads": torch.get_num_threads(),
                              "device": device, "dtype": args.dtype,
                              "flops_per_token": _flops_per_token(model, train_set)}
    if args.variant.startswith("dpolab"):
        from transformers import TrainingArguments

        from dpolab.dpo.trainer import DpolabTrainer, token_budget_arguments
        from dpolab.precision import master_weight_optimizer, uses_bf16_weights
        from dpolab.scoring.collate import COMPILE_LENGTH_BUCKET, PreferenceCollator, choose_packed
        from dpolab.scoring.pairs import score_pairs

        if args.variant != "dpolab_python_gelu":
            use_fused_gelu(model)  # as dpolab.dpo.trainer.load_prepared does
        bf16_weights = uses_bf16_weights(device, args.dtype) and args.variant != "dpolab_autocast"
        if bf16_weights:
            model.to(torch.bfloat16)  # as load_prepared does; fp32 master copy in the optimizer
        result["bf16_weights"] = bf16_weights

        layout = {"dpolab_padded": "padded", "dpolab_packed": "packed"}.get(args.variant, config.batch_layout)
        collate = PreferenceCollator(tokenizer.pad_token_id, packed=choose_packed(layout, device, model))
        result["batch_layout"] = "packed" if collate.packed else "padded"
        start = time.perf_counter()
        ref_chosen, ref_rejected = score_pairs(
            model, train_set, collate, config.per_device_eval_batch_size, config.logps_chunk_size)
        result["reference_s"] = time.perf_counter() - start
        train_set = train_set.add_column("ref_chosen_logps", ref_chosen.tolist()).add_column(
            "ref_rejected_logps", ref_rejected.tolist())
        training_args = token_budget_arguments(TrainingArguments(  # as dpolab.dpo.trainer
            **common_args, bf16=bf16 and not bf16_weights, torch_compile=config.compile), config)
        optimizer = master_weight_optimizer(DpolabTrainer, training_args, model) if bf16_weights else None
        trainer = DpolabTrainer(model=model, args=training_args, train_dataset=train_set, optimizer_cls_and_kwargs=optimizer,
                            data_collator=dataclasses.replace(  # as dpolab.dpo.trainer: the reference pass has neither
                                collate, max_tokens=config.max_tokens_per_batch,
                                pad_to_multiple_of=COMPILE_LENGTH_BUCKET if config.compile else 1),
                            processing_class=tokenizer,
                            callbacks=callbacks, dpo_config=config)
    else:
        from trl import DPOConfig

        from dpolab.dpo.trl_engine import pretokenized_trainer_class

        if args.variant == "trl_default":
            dpo_args = DPOConfig(**common_args, max_length=args.max_length)  # gradient checkpointing, bf16: defaults
            reference = copy.deepcopy(model)  # a Hub model would get the same second copy from TRL itself
        else:
            dpo_args = DPOConfig(**common_args, max_length=args.max_length, precompute_ref_log_probs=True,
                                 gradient_checkpointing=False, bf16=bf16)
            reference = None
        start = time.perf_counter()
        trainer = pretokenized_trainer_class()(model=model, ref_model=reference, args=dpo_args,
                                               train_dataset=train_set, processing_class=tokenizer,
                                               callbacks=callbacks)
        if args.variant != "trl_default":
            result["reference_s"] = time.perf_counter() - start  # the precompute pass is most of __init__
        result.update(gradient_checkpointing=dpo_args.gradient_checkpointing, bf16=dpo_args.bf16)
    autocast_seen = _watch_autocast(model, device)
    timer.trainer = trainer
    run = RunFolder.create(cache / "run", {"benchmark": "train_throughput"})
    sampler_start = time.monotonic()
    with SystemSampler(run, interval_s=0.25 if device == "cuda" else 2.0):  # NVML power/energy -> system.jsonl
        trainer.train()
    result.update(timer.measured())
    result["autocast"] = autocast_seen[0] if autocast_seen else None
    # The dtype its matmuls run in: the GEMM rate its model FLOP rate is measured against.
    result["compute_dtype"] = "bf16" if result.get("bf16_weights") or result["autocast"] == str(torch.bfloat16) else "fp32"
    window = [t - sampler_start for t in result.pop("window_monotonic")]
    result.update(_power_in_window(run.system(), window, result))
    result["reference_pairs"] = len(train_set)
    if "reference_s" in result:
        # One epoch scores each pair once with the reference: add that cost per trained pair.
        per_pair = result["reference_s"] / len(train_set)
        result["amortised_pairs_per_s"] = 1 / (1 / result["pairs_per_s"] + per_pair)
    else:
        result["amortised_pairs_per_s"] = result["pairs_per_s"]  # reference already inside every step
    result["peak_rss_mb"] = peak_rss_mb()
    result["model_tflops_per_s"] = result["flops_per_token"] * result["tokens_per_s"] / 1e12
    if device == "cuda":
        result["device_name"] = torch.cuda.get_device_name()
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        peak = gpu_peak_tflops(result["device_name"])
        result["peak_tflops"] = peak
        result["mfu"] = result["model_tflops_per_s"] / peak if peak else None
    return result


def _flops_per_token(model, train_set) -> float:
    """Model FLOPs per trained token for this model and data (see common.training_flops_per_token)."""
    import torch

    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matmul = sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids)
    matmul += model.get_output_embeddings().weight.numel()  # the head multiplies, tied or not
    prompt = [len(p) for p in train_set["prompt_ids"]]
    lengths = [n + len(a) for key in ("chosen_ids", "rejected_ids") for n, a in zip(prompt, train_set[key],
                                                                                    strict=True)]
    mean_len = sum(n * n for n in lengths) / sum(lengths)  # token-weighted: attention grows with length
    cfg = model.config
    return training_flops_per_token(cfg.n_layer, cfg.n_embd, matmul, mean_len)


def _power_in_window(rows: list[dict[str, Any]], window: list[float], result: dict[str, Any]) -> dict[str, Any]:
    """Mean GPU 0 power and energy per pair over the measured steps, from NVML rows of system.jsonl.

    Energy is NVML's cumulative counter, differenced between the first and last sample inside the
    measured window (all training samples if the window holds fewer than two)."""
    gpu_rows = [(r["time_s"], r["gpus"][0]) for r in rows if r.get("gpus")]
    if not gpu_rows:
        return {"nvml_samples": 0}
    inside = [(t, g) for t, g in gpu_rows if window[0] <= t <= window[1]]
    if len(inside) < 2:
        inside = gpu_rows
    out: dict[str, Any] = {"nvml_samples": len(inside),
                           "gpu_power_w_mean": sum(g["power_w"] for _, g in inside) / len(inside),
                           "gpu_util_percent_mean": sum(g["util_percent"] for _, g in inside) / len(inside)}
    (t0, first), (t1, last) = inside[0], inside[-1]
    if first.get("energy_j") is not None and t1 > t0:
        energy_power_w = (last["energy_j"] - first["energy_j"]) / (t1 - t0)
        out["gpu_energy_power_w"] = energy_power_w
        out["gpu_energy_j_per_pair"] = energy_power_w * result["measured_s"] / result["pairs"]
    return out


def _watch_autocast(model, device: str) -> list[str | None]:
    """A list that the model's first forward fills with the autocast dtype active inside it (or
    None): what ``bf16=True`` really does, wherever Trainer or accelerate enters the context."""
    import torch

    seen: list[str | None] = []

    def record(module, args) -> None:
        if not seen:
            enabled = torch.is_autocast_enabled(device)
            seen.append(str(torch.get_autocast_dtype(device)) if enabled else None)

    model.get_input_embeddings().register_forward_pre_hook(record)
    return seen


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------

def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    script = Path(__file__).resolve()
    import torch

    runs: list[dict[str, Any]] = []
    info = machine_info()
    if args.threads:
        torch.set_num_threads(args.threads)  # the workers' thread count: the same limit
    gemm_before = gemm_rates(args.device)
    plan = [(model, rnd, variant) for model in args.models for rnd in range(args.repeats)
            for variant in rotated(args.variants, rnd)]
    for model, rnd, variant in tqdm(plan, desc="runs", unit="run"):
        steps = args.steps or DEFAULT_STEPS.get(model, 10)
        batch = args.batch or DEFAULT_BATCH.get(model, 2)
        worker_args = ["--variant", variant, "--model", model, "--steps", str(steps), "--warmup", str(args.warmup),
                       "--batch", str(batch), "--max-length", str(args.max_length), "--device", args.device,
                       "--dtype", args.dtype]
        worker_args += ["--gradient-accumulation-steps", str(args.gradient_accumulation_steps),
                        "--max-tokens-per-batch", str(args.max_tokens_per_batch)]
        if args.threads:
            worker_args += ["--threads", str(args.threads)]
        if args.profile_dir:
            worker_args += ["--profile-dir", str(args.profile_dir)]
        result = run_worker(script, worker_args)
        result["round"] = rnd
        runs.append(result)
        if args.partial:  # keep what is done if a long benchmark is stopped early
            write_results("train_throughput", {"partial": True, "machine": info, "runs": runs}, args.partial)
        logger.info("%s %s round %d: %.3f pairs/s, %.0f tokens/s, peak %.0f MB", model, variant, rnd,
                    result["pairs_per_s"], result["tokens_per_s"], result["peak_rss_mb"])
    info["load_avg_after"] = machine_info()["load_avg_1_5_15"]
    # Measured before and after the runs; the faster of the two is the machine's limit.
    gemm_after = gemm_rates(args.device)
    gemm = {f"{d}_tflops": max(gemm_before[f"{d}_tflops"], gemm_after[f"{d}_tflops"]) for d in ("fp32", "bf16")}
    gemm.update(before=gemm_before, after=gemm_after)
    for run in runs:
        run["gemm_share"] = gemm_share(run["model_tflops_per_s"], gemm, run["compute_dtype"])
    return {"benchmark": "train_throughput", "command": " ".join(sys.argv), "machine": info, "gemm": gemm,
            "summary": summarise_runs(runs), "runs": runs}


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and variant: median/min/max of each figure; per model: ratios of medians."""
    keys = ("pairs_per_s", "tokens_per_s", "amortised_pairs_per_s", "peak_rss_mb", "reference_s",
            "model_tflops_per_s", "gemm_share", "mfu", "peak_gpu_mem_mb", "gpu_power_w_mean", "gpu_energy_j_per_pair")
    summary: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        per_variant = {}
        for variant in dict.fromkeys(r["variant"] for r in runs if r["model"] == model):
            rows = [r for r in runs if r["model"] == model and r["variant"] == variant]
            per_variant[variant] = {k: summarize([r[k] for r in rows]) for k in keys
                                    if all(r.get(k) is not None for r in rows)}
        # dpolab against each TRL variant, and each other dpolab variant against dpolab.
        pairs = [("dpolab", other) for other in ("trl_default", "trl_tuned", "trl_tuned_no_cudnn")]
        pairs += [(variant, "dpolab") for variant in per_variant if variant.startswith("dpolab_")]
        ratios = {}
        for ours_name, theirs_name in pairs:
            ours, theirs = per_variant.get(ours_name), per_variant.get(theirs_name)
            if ours and theirs:
                ratios[f"{ours_name}_vs_{theirs_name}"] = {
                    "pairs_per_s": ours["pairs_per_s"]["median"] / theirs["pairs_per_s"]["median"],
                    "amortised_pairs_per_s": (ours["amortised_pairs_per_s"]["median"]
                                              / theirs["amortised_pairs_per_s"]["median"]),
                    "peak_rss": ours["peak_rss_mb"]["median"] / theirs["peak_rss_mb"]["median"],
                }
        summary[model] = {"variants": per_variant, "ratios": ratios}
    return summary


def markdown_table(data: dict[str, Any]) -> str:
    gpu = any("peak_gpu_mem_mb" in s for e in data["summary"].values() for s in e["variants"].values())
    gpu_head = " MFU | peak GPU MB | GPU W | GPU J/pair |" if gpu else ""
    lines = []
    if "gemm" in data:
        lines += [f"GEMM rate, GPT-2 shapes (same invocation, best of before/after): fp32 "
                  f"{data['gemm']['fp32_tflops']:.3f} TFLOP/s, bf16 {data['gemm']['bf16_tflops']:.3f} TFLOP/s", ""]
    lines += ["| model | variant | pairs/s (min-max) | tokens/s | amortised pairs/s | reference pass s "
              "| peak RSS MB | model TFLOP/s | of GEMM rate (its dtype) |" + gpu_head,
              "|---|---|---|---|---|---|---|---|---|" + "---|" * gpu_head.count("|")]
    for model, entry in data["summary"].items():
        for variant, s in entry["variants"].items():
            ref = f"{s['reference_s']['median']:.1f}" if "reference_s" in s else "in every step"
            share = f"{s['gemm_share']['median']:.1%}" if "gemm_share" in s else "-"
            line = (f"| {model} | {variant} | {s['pairs_per_s']['median']:.2f} ({s['pairs_per_s']['min']:.2f}-"
                    f"{s['pairs_per_s']['max']:.2f}) | {s['tokens_per_s']['median']:.0f} | "
                    f"{s['amortised_pairs_per_s']['median']:.2f} | {ref} | {s['peak_rss_mb']['median']:.0f} | "
                    f"{s['model_tflops_per_s']['median']:.3f} | {share} |")
            if gpu:
                cells = [("mfu", "{:.1%}"), ("peak_gpu_mem_mb", "{:,.0f}"),
                         ("gpu_power_w_mean", "{:.0f}"), ("gpu_energy_j_per_pair", "{:.2f}")]
                line += "".join(f" {fmt.format(s[k]['median']) if k in s else '-'} |" for k, fmt in cells)
            lines.append(line)
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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: dpolab on CPU trains bf16 weights (fp32 master copy), on GPU autocast; TRL "
                        "tuned: Trainer's bf16 (autocast); TRL defaults keep DPOConfig's bf16=True")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1,
                        help="micro-batches of --batch pairs per optimizer step (every variant)")
    parser.add_argument("--max-tokens-per-batch", type=int, default=4096,
                        help="the dpolab_token_budget variant's TrainConfig.max_tokens_per_batch: each optimizer "
                        "batch (batch x accumulation pairs) in the fewest forwards of at most this many tokens")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--profile-dir", type=Path, default=None,
                        help="write each variant's torch.profiler tables over the measured steps here "
                        "(profiling slows the steps: use for diagnosis, not for the figures)")
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
