"""Where `make demo`'s memory goes: resident memory (RSS) at every stage of the demo, one process.

    python benchmarks/memory_profile.py                 # the demo's configs, a fresh data cache

Runs what ``dpolab demo`` runs (SFT stage, then the sweep's trials in this process, then the
report) with each stage's entry points wrapped: loading the tokenizer and model, preparing the
data, the reference pass, Trainer's first training step, each evaluation, each stage's end. A
thread samples RSS every 20 ms, so each stage reports its RSS when it ends and its peak while it
ran; the stage with the highest peak is the process's peak (``ru_maxrss``, what ``summary.json``
calls ``peak_rss_mb``). ``--trials N`` stops the sweep after N trials (its YAML order).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import machine_info, publish

REPO = Path(__file__).resolve().parent.parent
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_MB


class StageMemory:
    """The current stage's name, its peak RSS (sampled by a thread) and each finished stage's figures."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.stage, self.peak, self.rows = "start", rss_mb(), []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                self.peak = max(self.peak, rss_mb())

    def end(self, next_stage: str) -> None:
        """Close the current stage (its RSS now and its peak) and start ``next_stage``."""
        now = rss_mb()
        with self._lock:
            self.rows.append({"stage": self.stage, "rss_mb": round(now, 1), "peak_mb": round(max(self.peak, now), 1),
                              "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
            print(f"{self.stage:55s} rss {now:8.0f} MB  peak {self.rows[-1]['peak_mb']:8.0f} MB", flush=True)
            self.stage, self.peak = next_stage, now

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def wrap(memory: StageMemory, owner: Any, name: str, label: str, first_only: bool = False) -> None:
    """Make ``owner.name`` a stage: '<label>' from its call to its return (then '<label>: after')."""
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def staged(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if first_only and calls[0] > 1:
            return original(*args, **kwargs)
        memory.end(f"{memory.context} {label}")
        result = original(*args, **kwargs)
        memory.end(f"{memory.context} after {label}")
        return result

    setattr(owner, name, staged)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "sweep-demo.yaml")
    parser.add_argument("--sft-config", type=Path, default=REPO / "configs" / "sft-demo.yaml")
    parser.add_argument("--trials", type=int, default=None, help="stop the sweep after this many trials")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dpolab-memory-"))
    os.environ["DPOLAB_CACHE"] = str(work / "cache")  # fresh: the data and reference pass really run
    os.environ.setdefault("TQDM_DISABLE", "1")
    memory = StageMemory()
    memory.context = ""
    memory.end("import torch")
    import torch  # noqa: F401

    memory.end("import transformers, datasets, dpolab (the demo's modules)")
    import transformers

    import dpolab.dpo.trainer as dpo_trainer
    import dpolab.sft.trainer as sft_trainer
    import dpolab.sweep.runner as runner
    from dpolab.demo import sft_stage
    from dpolab.report import write_report
    from dpolab.sweep.config import load_sweep_config
    from dpolab.sweep.runner import run_sweep

    memory.end("idle")
    for module in (dpo_trainer, sft_trainer):
        wrap(memory, module, "load_tokenizer", "load tokenizer")
        wrap(memory, module, "load_model", "load model")
        wrap(memory, module, "prepare_data", "prepare data")
        wrap(memory, module, "fit", "train (fit)")
    wrap(memory, dpo_trainer, "add_reference_logps", "reference pass")
    wrap(memory, transformers.Trainer, "training_step", "first training step", first_only=True)
    wrap(memory, transformers.Trainer, "evaluate", "evaluate")
    trials_done = [0]
    sweep_train = runner.run_trial

    def run_trial(study, trial, config, sweep, backend):
        if args.trials is not None and trials_done[0] >= args.trials:
            raise SystemExit(0)
        trials_done[0] += 1
        memory.context = f"trial {trials_done[0]}:"
        memory.end(f"{memory.context} start")
        return sweep_train(study, trial, config, sweep, backend)

    runner.run_trial = run_trial

    start = time.perf_counter()
    memory.context = "sft:"
    sweep_config = load_sweep_config(args.config)
    sweep_config.base["model"] = str(sft_stage(args.sft_config, work / "demo" / "sft").path)
    memory.context = "sweep:"
    try:
        sweep = run_sweep(sweep_config, work / "demo")
        memory.context = "report:"
        memory.end("report: write")
        write_report(sweep.path)
    except SystemExit:
        pass
    memory.end("end")
    memory.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worst = max(memory.rows, key=lambda r: r["peak_mb"])
    lines = [f"peak RSS (ru_maxrss) {peak:,.0f} MB, reached in stage: {worst['stage']}", "",
             "| stage | RSS at its end MB | peak during it MB |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['rss_mb']:,.0f} | {r['peak_mb']:,.0f} |" for r in memory.rows]
    data = {"benchmark": "memory_profile", "command": " ".join(sys.argv), "machine": machine_info(),
            "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": peak, "stages": memory.rows}
    publish("memory_profile", data, args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
