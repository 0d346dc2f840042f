"""Preparing a full-size HH-RLHF file: before (lists in memory) vs after (``datasets`` Arrow + batched map).

    python benchmarks/data_prep.py --repeat 70 --rounds 1

The input is the bundled sample (2,312 rows) repeated ``--repeat`` times into one ``.jsonl`` file
(70 times: 161,840 rows, the size of full HH-RLHF), written by this script. Per variant, in a fresh
process each: wall time of ``prepare_data`` (tokenizer loaded beforehand), peak memory of the
process tree (PSS and RSS, sampled every 100 ms, ``num_proc`` workers included), and for ``after`` the cache-hit time of
a second fresh process on the same cache. ``before`` is the pre-``datasets`` pipeline, loaded from
git (``--before-rev``: its ``src/dpolab/data.py``) so both run in the same invocation. Variants
alternate every round.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine_info, publish, rotated, run_worker, summarize

from dpolab.periodic import Periodic

logger = logging.getLogger("data_prep")
BEFORE_REV = "b1d4a01"  # the last commit with the list-based src/dpolab/data.py
REPO = Path(__file__).resolve().parent.parent


class TreeRss(Periodic):
    """Peak memory of this process plus its children (the ``num_proc`` map workers), sampled.

    ``peak`` sums RSS, which counts the pages a forked worker shares with its parent (torch's
    libraries, the tokenizer) once per process: an upper bound. ``peak_pss`` sums PSS (shared
    pages split between the processes sharing them): the memory the tree really holds."""

    def __init__(self, every_s: float = 0.1) -> None:
        import psutil

        super().__init__(every_s, name="tree-rss")
        self.process, self.peak, self.peak_pss = psutil.Process(), 0, 0

    def tick(self) -> None:
        import psutil

        rss = pss = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a worker that just exited
                info = proc.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)


def make_input(folder: Path, repeat: int) -> Path:
    from dpolab.data import sample_path

    lines = gzip.decompress(sample_path().read_bytes()).decode().splitlines(keepends=True)
    path = folder / f"hh-x{repeat}.jsonl"
    with path.open("w") as handle:
        for _ in range(repeat):
            handle.writelines(lines)
    return path


def load_before(rev: str) -> Any:
    """The old pipeline module, as it was at ``rev`` (needs git and the repository's history)."""
    source = subprocess.run(["git", "show", f"{rev}:src/dpolab/data.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="dpolab-before-")) / "data_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("data_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_before"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def worker(args: argparse.Namespace) -> None:
    from dpolab.config import TrainConfig
    from dpolab.model import load_tokenizer

    prepare = load_before(args.before_rev).prepare_data if args.variant == "before" else None
    if prepare is None:
        from dpolab.data import prepare_data as prepare
    tokenizer = load_tokenizer("tiny-gpt2")
    config = TrainConfig(dataset=args.input, cache_dir=args.cache, max_length=512, max_prompt_length=256)
    with TreeRss() as rss:
        start = time.perf_counter()
        datasets, report, _ = prepare(config, tokenizer)
        seconds = time.perf_counter() - start
    Path(args.out).write_text(json.dumps({"seconds": seconds, "peak_rss_mb": rss.peak / 2**20,
                                          "peak_pss_mb": rss.peak_pss / 2**20,
                                          "kept": dict(report.kept), "rows_read": report.rows_read}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=70, help="copies of the 2,312-row sample (70: 161,840 rows)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["before", "after"], choices=["before", "after"])
    parser.add_argument("--before-rev", default=BEFORE_REV)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = []
    with tempfile.TemporaryDirectory(prefix="dpolab-data-bench-") as tmp:
        path = make_input(Path(tmp), args.repeat)
        for round_index in range(args.rounds):
            for variant in rotated(args.variants, round_index):
                cache = str(Path(tmp) / f"cache-{variant}-{round_index}")
                common = ["--variant", variant, "--input", str(path), "--cache", cache, "--before-rev", args.before_rev]
                result = {"variant": variant, "round": round_index, **run_worker(Path(__file__), common)}
                if variant == "after":
                    result["cache_hit_s"] = run_worker(Path(__file__), common)["seconds"]
                logger.info("%s", result)
                runs.append(result)
    summary = {v: {k: summarize([r[k] for r in runs if r["variant"] == v]) for k in ("seconds", "peak_rss_mb", "peak_pss_mb")}
               for v in args.variants}
    if "after" in args.variants:
        summary["after"]["cache_hit_s"] = summarize([r["cache_hit_s"] for r in runs if r["variant"] == "after"])
    rows = [f"| {v} | {summary[v]['seconds']['median']:.1f} | {summary[v]['peak_pss_mb']['median']:.0f} | "
            f"{summary[v]['peak_rss_mb']['median']:.0f} | "
            + (f"{summary[v]['cache_hit_s']['median']:.2f} |" if v == "after" else "— |") for v in args.variants]
    table = "\n".join([f"rows: {runs[0]['rows_read']} ({args.repeat} x the sample), rounds: {args.rounds}", "",
                       "| pipeline | prepare s | peak PSS MB (tree) | peak RSS MB (tree, sum) | cache hit s |",
                       "|---|---|---|---|---|",
                       *rows])
    publish("data_prep", {"machine": machine_info(), "repeat": args.repeat, "runs": runs, "summary": summary},
            args.out, table)


if __name__ == "__main__":
    sys.exit(main())
