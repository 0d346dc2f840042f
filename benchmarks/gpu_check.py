"""The GPU check in one command: throughput vs TRL, generation latency, and `dpolab train` / `dpolab
sweep` end to end on CUDA, with every figure written to ``$OUT`` (else benchmarks/results/gpu).

    PYTHONPATH=$PWD/src python3 benchmarks/gpu_check.py            # ~4 minutes on one H100/H200

It runs dpolab from source (``src/`` is put on ``PYTHONPATH`` for every stage; no install, no venv
needed) and needs CUDA: without it, it stops at once with one line saying so. Stages, each a fresh
subprocess with its own time limit, whose output goes to the console and to ``gpu_check.log``:

1. ``throughput``: benchmarks/train_throughput.py, dpolab vs TRL defaults vs TRL tuned (``--variants``
   adds e.g. ``dpolab_packed``, packed batches) on the GPT-2 124M architecture, bf16, batch 8 pairs,
   max_length 512: pairs/s, tokens/s, peak GPU memory,
   MFU = (6 N + 12 L H T) x tokens/s / bf16 dense peak (see common.training_flops_per_token and
   common.gpu_peak_tflops), mean GPU power and energy per pair from the run's system.jsonl (NVML).
2. ``generation``: benchmarks/generate_latency.py on CUDA (plain fp32, fp32, bf16).
3. ``train``: ``dpolab train`` on the bundled sample (GPT-2 124M architecture, bf16): summary.json,
   and GPU power / energy / utilisation from its system.jsonl.
4. ``sweep``: ``dpolab sweep`` (grid of 2 tiny-gpt2 trials) on CUDA, with its report (not with --quick).
5. ``fsdp``: the Trainer + FSDP2 path (what ``accelerate launch --use_fsdp`` sets up: the
   ``ACCELERATE_USE_FSDP``/``FSDP_*`` variables) under ``torchrun`` on one GPU, against the same run
   without FSDP (``fsdp_reference``): the wrapping is checked and the first 3 losses must agree to 1e-4
   (fp32). Accelerate enables FSDP only on GPUs, so this is where it runs (tests/dpo/test_distributed.py
   checks the sharded head itself on CPU).
6. ``profile`` (opt-in, ``--stages profile``): the throughput variants again, 3 steps each under
   torch.profiler and cProfile, tables in ``profile/profile_<variant>.txt``: where a step's time goes.

Results: ``gpu_check.json`` (every stage: status, seconds, figures), ``gpu_check.md`` (the tables for
BENCHMARKS.md), ``gpu_check.log``, the two benchmark JSONs, and the run/sweep records without their
model weights. A failed stage is recorded and the others still run; the exit status is 1 then.
``--device cpu --quick`` runs the same path in a minute on tiny-gpt2 (the smoke test does).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
SRC = REPO / "src"
sys.path.insert(0, str(SRC))  # dpolab from source: this checkout, never an installed copy

logger = logging.getLogger("gpu_check")

# Record files copied from run and sweep folders into the results (weights and checkpoints stay behind).
RECORD_SUFFIXES = {".json", ".jsonl", ".yaml", ".md", ".html", ".png", ".csv"}


def environment(device: str) -> dict[str, Any]:
    """Versions and the device, checked before anything runs."""
    import torch

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "device": device}
    for name in ("transformers", "accelerate", "trl", "datasets", "optuna", "nvidia-ml-py"):
        try:  # metadata only: importing TRL costs seconds
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    return env


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: error: CUDA is not available (torch {torch.__version__}, built for CUDA "
                 f"{torch.version.cuda}); run on a GPU machine, or pass --device cpu for the CPU smoke path")


class Stages:
    """Runs each stage as a subprocess, streams its output to the console and the log, records the result."""

    def __init__(self, out_dir: Path, work_dir: Path, log_path: Path, slack: float = 1) -> None:
        self.out_dir, self.work_dir, self.log_path = out_dir, work_dir, log_path
        self.slack = slack  # time limits are sized for a GPU (sum 530 s); a (shared) CPU gets this factor more
        self.on_stage_done = None
        self.results: dict[str, Any] = {}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(SRC), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]),
            "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "DPOLAB_CACHE": str(work_dir / "cache")}

    def run(self, name: str, cmd: list[str], timeout_s: float, collect, extra_env: dict[str, str] | None = None) -> None:
        """Run ``cmd``; on success ``collect()`` returns the stage's figures."""
        timeout_s *= self.slack
        logger.info("stage %s: %s", name, " ".join(cmd))
        start = time.monotonic()
        entry: dict[str, Any] = {"command": " ".join(cmd)}
        with self.log_path.open("a") as log:
            log.write(f"\n===== stage {name}: {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=self.work_dir, env={**self.env, **(extra_env or {})}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            try:
                rc = _stream(proc, log, deadline=start + timeout_s)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        entry["seconds"] = round(time.monotonic() - start, 1)
        if rc is None:
            entry.update(status="timeout", error=f"killed after {timeout_s:.0f} s")
        elif rc != 0:
            entry.update(status="failed", error=f"exit status {rc} (see gpu_check.log)")
        else:
            try:
                entry.update(status="ok", **collect())
            except Exception as exc:  # a stage that ran but left no usable records is a failure too
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        logger.info("stage %s: %s in %.0f s%s", name, entry["status"], entry["seconds"],
                    f" ({entry['error']})" if "error" in entry else "")
        self.results[name] = entry
        if self.on_stage_done:
            self.on_stage_done()  # results so far on disk: a run cut short by its caller keeps them


def _stream(proc: subprocess.Popen, log, deadline: float) -> int | None:
    """Copy the process's output line by line to stdout and the log; None if it ran past the deadline."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if selector.select(timeout=min(remaining, 1.0)):
            line = proc.stdout.readline()
            if not line:
                return proc.wait()
            sys.stdout.write(line)
            log.write(line)
            log.flush()


def copy_records(src: Path, dst: Path) -> list[str]:
    """Copy the small record files of a run or sweep folder (no weights, no checkpoints)."""
    copied = []
    for path in sorted(src.rglob("*")):
        parts = path.relative_to(src).parts
        if not path.is_file() or path.suffix not in RECORD_SUFFIXES or {"model", "checkpoints"} & set(parts):
            continue
        if path.stat().st_size > 5 * 2**20:
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(str(path.relative_to(src)))
    return copied


def gpu_from_system(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/max power, energy used and utilisation of GPU 0 over a run's system.jsonl (NVML samples)."""
    gpu = [r["gpus"][0] for r in rows if r.get("gpus")]
    if not gpu:
        return {"nvml_samples": 0}
    out: dict[str, Any] = {"nvml_samples": len(gpu),
                           "gpu_power_w_mean": round(sum(g["power_w"] for g in gpu) / len(gpu), 1),
                           "gpu_power_w_max": round(max(g["power_w"] for g in gpu), 1),
                           "gpu_util_percent_mean": round(sum(g["util_percent"] for g in gpu) / len(gpu), 1),
                           "gpu_mem_mb_max": max(g["mem_mb"] for g in gpu)}
    if gpu[0].get("energy_j") is not None:
        out["gpu_energy_j"] = round(gpu[-1]["energy_j"] - gpu[0]["energy_j"], 1)
    return out


def collect_train(run_dir: Path, out_dir: Path, device: str) -> dict[str, Any]:
    from dpolab.runs import RunFolder

    run = RunFolder.open(run_dir)
    summary = run.summary()
    figures = {"summary": {k: summary.get(k) for k in ("train", "eval", "wall_time_s", "pairs_per_s",
                                                        "tokens_per_s", "reference_time_s", "peak_rss_mb")},
               "model_saved": run.has_model(), **gpu_from_system(run.system())}
    if figures.get("gpu_energy_j") and summary.get("pairs_per_s"):
        pairs = summary["pairs_per_s"] * summary["wall_time_s"]
        figures["gpu_energy_j_per_pair"] = round(figures["gpu_energy_j"] / pairs, 2)
    if device == "cuda" and not figures["nvml_samples"]:
        raise RuntimeError("system.jsonl has no NVML GPU samples (is nvidia-ml-py installed?)")
    if not figures["model_saved"]:
        raise RuntimeError(f"{run_dir}: no model saved")
    figures["records"] = copy_records(run_dir, out_dir)
    return figures


def collect_sweep(sweep_dir: Path, out_dir: Path) -> dict[str, Any]:
    from dpolab.runs import SweepFolder

    sweep = SweepFolder.open(sweep_dir)
    best = sweep.best()
    trials = {t.path.name: (t.summary()["eval"].get("loss") if t.summary_path.exists() else None)
              for t in sweep.trials()}
    if None in trials.values():
        raise RuntimeError(f"a trial did not finish: {trials}")
    return {"best": best, "trial_eval_loss": trials, "records": copy_records(sweep_dir, out_dir)}


def sweep_yaml(path: Path, device: str, dtype: str, quick: bool) -> Path:
    import yaml

    base = {"model": "tiny-gpt2", "dataset": "hh-rlhf-sample", "max_train_pairs": 8 if quick else 256,
            "max_eval_pairs": 4 if quick else 64, "num_train_epochs": 1, "per_device_train_batch_size": 4 if quick else 8,
            "per_device_eval_batch_size": 16, "logging_steps": 1 if quick else 4, "max_length": 128 if quick else 512,
            "max_prompt_length": 64 if quick else 256, "eval_steps": None if quick else 16,
            "device": device, "dtype": dtype}
    config = {"mode": "grid", "base": base, "objective": "eval/loss", "direction": "minimize",
              "trials": [{"name": "lr5e-4", "learning_rate": 5e-4}, {"name": "lr1e-3", "learning_rate": 1e-3}]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def markdown(report: dict[str, Any]) -> str:
    """The tables that go into BENCHMARKS.md."""
    env = report["environment"]
    lines = [f"GPU check on {env.get('gpu', env['device'])} (torch {env['torch']}, CUDA {env['torch_cuda']}, "
             f"transformers {env['transformers']}, TRL {env['trl']}); total {report['total_seconds']:.0f} s.",
             "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in report["stages"].items()]
    for name in ("throughput", "generation"):
        table = report["stages"].get(name, {}).get("table")
        if table:
            lines += ["", f"**{name}** (`{report['stages'][name]['command']}`)", "", table]
    train = report["stages"].get("train", {})
    if train.get("status") == "ok":
        s = train["summary"]
        lines += ["", f"**dpolab train** (bundled sample, {env['device']}: `{train['command']}`)", "",
                  "| pairs/s | tokens/s | wall s | eval loss | GPU W mean (max) | GPU energy J | J/pair | GPU util % |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {s['pairs_per_s']} | {s['tokens_per_s']} | {s['wall_time_s']} | "
                  f"{s['eval'].get('loss', float('nan')):.4f} | {train.get('gpu_power_w_mean', '-')} "
                  f"({train.get('gpu_power_w_max', '-')}) | {train.get('gpu_energy_j', '-')} | "
                  f"{train.get('gpu_energy_j_per_pair', '-')} | {train.get('gpu_util_percent_mean', '-')} |"]
    fsdp = report["stages"].get("fsdp", {})
    if fsdp.get("status") == "ok":
        lines += ["", f"**FSDP2** ({fsdp['wrapping']['fsdp2_units']} FSDP2 units): first 3 losses "
                  f"{fsdp['losses_fsdp']} vs {fsdp['losses_plain']} without FSDP, max diff {fsdp['max_abs_diff']:.1e}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--model", default="gpt2-124m-random", help="model of the throughput and train stages")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="measured throughput steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="throughput rounds (run order rotated)")
    parser.add_argument("--variants", nargs="+", default=["dpolab", "trl_default", "trl_tuned"],
                        help="train_throughput.py variants; add dpolab_packed to measure packed batches, which "
                        "`auto` does not yet choose on GPUs (about 30 s a run on an H200; the stage has 190 s)")
    parser.add_argument("--train-steps", type=int, default=40, help="optimizer steps of the dpolab train stage")
    parser.add_argument("--gen-tokens", type=int, default=128, help="new tokens per generation measurement")
    parser.add_argument("--stages", nargs="+", default=None, choices=[*STAGES, "profile"],
                        help="default: all but profile (opt-in: torch.profiler + cProfile tables of the "
                        "throughput variants' steps); on --device cpu also not fsdp (accelerate enables FSDP "
                        "on GPUs only)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke sizes (1-2 steps, short generations, tiny sweep); use with --device cpu")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="results folder (default: $OUT, else benchmarks/results/gpu)")
    parser.add_argument("--work-dir", type=Path, default=None, help="run folders and caches (default: a temp dir)")
    parser.add_argument("--fsdp-worker", nargs=2, metavar=("CONFIG", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stages is None:
        args.stages = STAGES if args.device == "cuda" else [s for s in STAGES if s != "fsdp"]
    if args.out_dir is None:
        args.out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else BENCHMARKS / "results" / "gpu"
    return args


def throughput_command(args: argparse.Namespace, out: Path, steps: int, repeats: int) -> list[str]:
    """benchmarks/train_throughput.py on the check's model, variants, device, dtype and batch."""
    return [sys.executable, str(BENCHMARKS / "train_throughput.py"), "--models", args.model, "--variants",
            *args.variants, "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
            "--max-length", str(args.max_length), "--steps", str(steps), "--warmup", str(args.warmup),
            "--repeats", str(repeats), "--out", str(out)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fsdp_worker:
        return fsdp_worker(*args.fsdp_worker)
    if args.device == "cuda":
        require_cuda()
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = (args.work_dir or Path(tempfile.mkdtemp(prefix="dpolab-gpu-check-"))).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "gpu_check.log"
    log_path.write_text("")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(), logging.FileHandler(log_path)])
    env = environment(args.device)
    logger.info("environment: %s", json.dumps(env))
    stages = Stages(out_dir, work_dir, log_path, slack=1 if args.device == "cuda" else 4)
    python, quick = sys.executable, args.quick
    start = time.monotonic()

    def write_report() -> dict[str, Any]:
        report = {"check": "gpu_check", "command": " ".join(sys.argv), "environment": env,
                  "total_seconds": round(time.monotonic() - start, 1), "stages": stages.results}
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out_dir / "gpu_check.md").write_text(markdown(report))
        return report

    stages.on_stage_done = write_report

    if "throughput" in args.stages:
        out = out_dir / "train_throughput.json"
        stages.run("throughput", throughput_command(args, out, args.steps, args.repeats), timeout_s=190,
                   collect=lambda: _benchmark_figures(out, "train_throughput"))
    if "profile" in args.stages:  # opt-in: where a step's time goes (a slower run, not a figure)
        out, profile_dir = work_dir / "profile.json", out_dir / "profile"
        stages.run("profile", [*throughput_command(args, out, steps=3, repeats=1), "--profile-dir", str(profile_dir)],
                   timeout_s=150, collect=lambda: {"tables": sorted(p.name for p in profile_dir.iterdir())})
    if "generation" in args.stages:
        out = out_dir / "generate_latency.json"
        stages.run("generation", [
            python, str(BENCHMARKS / "generate_latency.py"), "--model", args.model, "--device", args.device,
            "--dtype", "fp32", "bf16", "--repeats", "1" if quick else "3", "--new-tokens", str(args.gen_tokens),
            "--prompt-tokens", "16" if quick else "256", "--quality-pairs", "1" if quick else "4",
            "--agree-prompts", "1" if quick else "4", "--agree-tokens", "3" if quick else "32",
            "--out", str(out)], timeout_s=70, collect=lambda: _benchmark_figures(out, "generate_latency"))
    if "train" in args.stages:
        run_dir = work_dir / "train"
        shutil.rmtree(run_dir, ignore_errors=True)
        stages.run("train", [
            python, "-m", "dpolab.cli", "train", "--model", args.model, "--device", args.device,
            "--dtype", args.dtype, "--max-length", str(args.max_length), "--max-prompt-length",
            str(args.max_length // 2), "--per-device-train-batch-size", str(args.batch),
            "--max-train-pairs", str(args.batch * args.train_steps), "--max-eval-pairs", str(2 * args.batch),
            "--max-steps", str(args.train_steps), "--logging-steps", str(max(1, args.train_steps // 4)),
            "--save-steps", str(args.train_steps), "--output-dir", str(run_dir)], timeout_s=100,
            collect=lambda: collect_train(run_dir, out_dir / "train", args.device))
    if "sweep" in args.stages:
        sweep_dir = work_dir / "sweep"
        shutil.rmtree(sweep_dir, ignore_errors=True)
        config = sweep_yaml(work_dir / "sweep-gpu-check.yaml", args.device, args.dtype, quick)
        stages.run("sweep", [python, "-m", "dpolab.cli", "sweep", "--config", str(config), "--output-dir",
                             str(sweep_dir), *([] if quick else ["--report"])], timeout_s=70,
                   collect=lambda: collect_sweep(sweep_dir, out_dir / "sweep"))

    if "fsdp" in args.stages:
        config = fsdp_yaml(work_dir / "fsdp.yaml", args.device)
        plain, sharded = work_dir / "fsdp-reference", work_dir / "fsdp"
        for folder in (plain, sharded):
            shutil.rmtree(folder, ignore_errors=True)
        stages.run("fsdp_reference", [python, __file__, "--fsdp-worker", str(config), str(plain)], timeout_s=40,
                   collect=lambda: {"wrapping": json.loads((plain / "wrapping.json").read_text())})
        stages.run("fsdp", [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                            __file__, "--fsdp-worker", str(config), str(sharded)], timeout_s=60,
                   extra_env=FSDP_ENV, collect=lambda: compare_fsdp(plain, sharded))

    report = write_report()
    failed = [name for name, s in stages.results.items() if s["status"] != "ok"]
    logger.info("done in %.0f s; results in %s%s", report["total_seconds"], out_dir,
                f"; FAILED: {', '.join(failed)}" if failed else "")
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if failed else 0


STAGES = ["throughput", "generation", "train", "sweep", "fsdp"]
# What `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP` exports.
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "GPT2Block", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}


def fsdp_yaml(path: Path, device: str) -> Path:
    import yaml

    config = {"model": "tiny-gpt2", "max_train_pairs": 32, "max_eval_pairs": 8, "max_length": 256,
              "max_prompt_length": 128, "per_device_train_batch_size": 4, "max_steps": 3, "logging_steps": 1,
              "learning_rate": 1e-3, "group_by_length": False, "seed": 0, "device": device, "dtype": "fp32"}
    path.write_text(yaml.safe_dump(config))
    return path


def fsdp_worker(config_path: str, run_dir: str) -> int:
    """`dpolab train` with a callback recording how Trainer wrapped the model (FSDP2 or not)."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import TrainerCallback

    from dpolab.config import load_config
    from dpolab.dpo.trainer import train

    class RecordWrapping(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1 and state.is_world_process_zero:
                units = sum(isinstance(m, FSDPModule) for m in model.modules())
                (Path(run_dir) / "wrapping.json").write_text(json.dumps(
                    {"model_class": type(model).__name__, "fsdp2_units": units}))

    logging.basicConfig(level=logging.INFO)
    train(load_config(config_path), run_dir, callbacks=[RecordWrapping()])
    return 0


def compare_fsdp(plain: Path, sharded: Path) -> dict[str, Any]:
    from dpolab.runs import RunFolder

    wrapping = json.loads((sharded / "wrapping.json").read_text())
    if not wrapping["fsdp2_units"]:
        raise RuntimeError(f"Trainer did not wrap the model with FSDP2: {wrapping}")
    a = [r["loss"] for r in RunFolder.open(plain).metrics("train")][:3]
    b = [r["loss"] for r in RunFolder.open(sharded).metrics("train")][:3]
    diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
    if len(a) < 3 or diff >= 1e-4:
        raise RuntimeError(f"FSDP losses differ from the plain run: {a} vs {b}")
    return {"wrapping": wrapping, "losses_plain": a, "losses_fsdp": b, "max_abs_diff": diff,
            "eval_loss_fsdp": RunFolder.open(sharded).summary()["eval"]["loss"]}


def _benchmark_figures(path: Path, name: str) -> dict[str, Any]:
    """The summary of a benchmark JSON and its Markdown table (the script's own formatter)."""
    data = json.loads(path.read_text())
    table = importlib.import_module(name).markdown_table(data)  # benchmarks/ is on sys.path (script dir)
    if name == "train_throughput":
        return {"table": table, "summary": data["summary"]}
    return {"table": table, "summary": {p: {k: r[k] for k in ("ms_per_token", "ttft_ms", "speedup_vs_plain_fp32")}
                                        for p, r in data["results"].items()}}


if __name__ == "__main__":
    sys.exit(main())
