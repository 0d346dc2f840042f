"""Serving under load: 8 concurrent streams against the real `dpolab serve` HTTP server, batched
(``--workers 8``: the streams share decode steps) vs one at a time (``--workers 1``).

    python benchmarks/serve_load.py --model gpt2-124m-random --precisions fp32 int8 --repeats 3

The script starts both servers itself (``dpolab serve MODEL --port 0`` subprocesses on 127.0.0.1,
stopped at the end). Each round, per precision, alternating which mode goes first: ``--streams``
client threads each send ``--requests-per-stream`` streaming ``/v1/completions`` requests (greedy,
``--new-tokens`` tokens, one of a fixed set of chat prompts), one after another. Per mode:
aggregate tokens/s = completion tokens of all requests / the round's wall time; time to first token
(TTFT) = request sent to first streamed text, queueing included, p50/p95 over every request.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common import machine_info, publish, rotated, summarize

logger = logging.getLogger("serve_load")

MODES = {"batched": None, "one_at_a_time": 1}  # --workers (None = --streams); the queue holds every stream
QUESTIONS = ["How do I make a cup of tea?", "What is the capital of France, and why is it famous?",
             "Can you recommend a good book about the history of science for a teenager?", "Tell me a joke.",
             "My plant's leaves are turning yellow. What could be wrong with it and how do I fix it?",
             "Explain recursion simply.", "What should I pack for a three-day hiking trip in the mountains in autumn?",
             "Is it safe to eat raw cookie dough?"]
CLI = "import sys; from dpolab.cli import main; sys.exit(main())"


class Server:
    """`dpolab serve` in a subprocess; ``url`` once it listens and its model is loaded."""

    def __init__(self, model: str, precision: str, workers: int, queue: int, new_tokens: int,
                 threads: int | None) -> None:
        env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLI, "serve", model, "--port", "0", "--precision", precision,
             "--workers", str(workers), "--queue", str(queue), "--max-new-tokens", str(new_tokens),
             "--preferences", os.devnull],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                break
        else:
            raise RuntimeError(f"dpolab serve exited ({self.proc.wait()}) before listening")
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        deadline = time.monotonic() + 600
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("dpolab serve never became healthy")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stream_completion(url: str, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    """One streaming request: (seconds to first text, total seconds, completion tokens)."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens


def load_round(url: str, streams: int, per_stream: int, new_tokens: int) -> dict[str, Any]:
    """``streams`` client threads, ``per_stream`` requests each: (aggregate tokens/s, TTFTs)."""
    ttfts: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(per_stream):
            prompt = f"\n\nHuman: {QUESTIONS[(i + j) % len(QUESTIONS)]}\n\nAssistant:"
            try:
                ttft, _, n = stream_completion(url, prompt, new_tokens)
            except (urllib.error.URLError, ConnectionError) as exc:
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                ttfts.append(ttft)
                tokens.append(n)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return {"tokens_per_s": sum(tokens) / wall, "wall_s": wall, "tokens": sum(tokens), "ttft_s": ttfts}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for precision in args.precisions:
        workers = {mode: n or args.streams for mode, n in MODES.items()}
        servers = {mode: Server(args.model, precision, n, args.streams, args.new_tokens, args.threads) for mode, n in workers.items()}
        try:
            for server in servers.values():  # warm-up: first-call allocations and kernel selection
                # At most the server's --max-new-tokens: /v1 refuses a larger max_tokens (400).
                load_round(server.url, 2, 1, min(4, args.new_tokens))
            rounds: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for rnd in range(args.repeats):
                for mode in rotated(list(MODES), rnd):
                    rounds[mode].append(load_round(servers[mode].url, args.streams, args.requests_per_stream,
                                                   args.new_tokens))
                    logger.info("%s %s round %d: %.1f tokens/s", precision, mode, rnd, rounds[mode][-1]["tokens_per_s"])
        finally:
            for server in servers.values():
                server.stop()
        entry: dict[str, Any] = {}
        for mode, measured in rounds.items():
            ttfts = [t for r in measured for t in r["ttft_s"]]
            entry[mode] = {"workers": workers[mode], "tokens_per_s": summarize([r["tokens_per_s"] for r in measured]),
                           "ttft_ms": {"p50": percentile(ttfts, 50) * 1e3, "p95": percentile(ttfts, 95) * 1e3},
                           "requests": len(ttfts), "tokens": sum(r["tokens"] for r in measured)}
        entry["ratio_tokens_per_s"] = (entry["batched"]["tokens_per_s"]["median"]
                                       / entry["one_at_a_time"]["tokens_per_s"]["median"])
        results[precision] = entry
    return {"benchmark": "serve_load", "command": " ".join(sys.argv), "machine": machine_info(), "model": args.model,
            "streams": args.streams, "requests_per_stream": args.requests_per_stream, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "results": results}


def markdown_table(data: dict[str, Any]) -> str:
    lines = ["| precision | serving | workers | aggregate tokens/s median (min-max) | TTFT p50 ms | TTFT p95 ms | "
             "batched / one at a time |", "|---|---|---|---|---|---|---|"]
    for precision, entry in data["results"].items():
        for mode in MODES:
            r, t = entry[mode], entry[mode]["tokens_per_s"]
            ratio = f"**{entry['ratio_tokens_per_s']:.2f}x**" if mode == "batched" else ""
            lines.append(f"| {precision} | {mode.replace('_', ' ')} | {r['workers']} | {t['median']:.1f} "
                         f"({t['min']:.1f}-{t['max']:.1f}) | {r['ttft_ms']['p50']:.0f} | {r['ttft_ms']['p95']:.0f} | "
                         f"{ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-124m-random", help="anything `dpolab serve` takes")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "bf16", "int8"])
    parser.add_argument("--streams", type=int, default=8, help="concurrent client streams")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per server (OMP_NUM_THREADS; default torch's choice)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    # SIGTERM (timeout, Ctrl-C from a job runner) unwinds like an exception, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    data = run(args)
    publish("serve_load", data, args.out, markdown_table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
