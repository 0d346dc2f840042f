"""Fixtures for the web app tests, flaskr style: ``app`` and ``client`` (Flask test client), plus
``live_server`` (the real waitress server on 127.0.0.1) for the openai-client, load and browser tests.

The models are random-init tiny GPT-2s: answers are gibberish, so tests check behaviour (events,
counts, status codes, cancellation), never content.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dpolab.runs import RunFolder, SweepFolder

EVAL = {"loss": 0.6812, "rewards/accuracies": 0.625, "rewards/margins": 0.0421,
        "rewards/chosen": 0.011, "rewards/rejected": -0.031}


def make_run(path: Path, beta: float = 0.1, eval_metrics: dict[str, float] | None = None,
             save_model: bool = True, **config: Any) -> RunFolder:
    """A finished tiny run following docs/run-folder.md (a stand-in for a trained run: the
    serve tests need the records and a loadable model, not training)."""
    from dpolab.config import TrainConfig, save_config
    from dpolab.model import build_builtin, load_tokenizer

    run = RunFolder.create(path, {"engine": "dpolab", "base_model": "tiny-gpt2", "dataset": "hh-rlhf-sample",
                                  "data_dir": None, "dpolab_version": "0.1.0"})
    save_config(TrainConfig(model="tiny-gpt2", beta=beta, max_steps=4, **config), run.config_path)
    if save_model:
        import torch

        model = build_builtin("tiny-gpt2")
        # Nudge the weights (seeded) so the "trained" policy differs from its reference and the
        # implicit rewards are not all exactly 0.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
        model.save_pretrained(run.model_dir)
        load_tokenizer("tiny-gpt2").save_pretrained(run.model_dir)
    run.write_summary({"train": {"loss": 0.69, "steps": 4, "epochs": 0.5}, "eval": eval_metrics or EVAL,
                       "wall_time_s": 1.0, "train_pairs": 16, "eval_pairs": 8})
    return run


@pytest.fixture(scope="session")
def run_dir(tiny_run: RunFolder) -> Path:
    """The project's trained tiny run (tests/conftest.py)."""
    return Path(tiny_run.path)


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-trial sweep whose best trial has a model, and a report/ with one plot."""
    sweep = SweepFolder.create(tmp_path_factory.mktemp("sweeps") / "beta-sweep",
                               {"mode": "grid", "objective": "eval/loss", "direction": "minimize"})
    make_run(sweep.trial_dir("trial-000"), beta=0.05, save_model=False,
             eval_metrics={**EVAL, "loss": 0.69})
    make_run(sweep.trial_dir("trial-001"), beta=0.2, eval_metrics=EVAL)
    sweep.write_best({"trial": "trial-001", "run_dir": "trials/trial-001", "model_dir": "trials/trial-001/model",
                      "objective": "eval/loss", "value": EVAL["loss"]})
    sweep.report_dir.mkdir()
    # A real 1x1 PNG, as `dpolab report` would write plots.
    png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
    for name in ("loss.png", "eval_loss.png", "table.png"):
        (sweep.report_dir / name).write_bytes(png)
    (sweep.report_dir / "report.html").write_text("<!doctype html><style>body{color:red}</style><h1>Report</h1>")
    return sweep.path


@pytest.fixture(scope="session")
def served(run_dir: Path) -> Any:
    """Policy + reference, loaded once for the whole session (each app reuses them)."""
    from dpolab.serve.models import load_served_models

    return load_served_models(str(run_dir))


@pytest.fixture
def make_app(served: Any, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    from dpolab.serve import create_app

    apps = []

    def factory(**overrides: Any) -> Any:
        config = {"TESTING": True, "MODELS": served, "PREFERENCES_PATH": str(tmp_path / "preferences.jsonl"),
                  "MAX_NEW_TOKENS": 64, "DEFAULT_MAX_NEW_TOKENS": 8, "WORKERS": 1, "MAX_QUEUE": 2,
                  "REQUEST_TIMEOUT_S": 60.0, **overrides}
        app = create_app(config)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["dpolab.engine"].close()


@pytest.fixture
def app(make_app: Callable[..., Any]) -> Any:
    return make_app()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def live_server(make_app: Callable[..., Any]) -> Iterator[Callable[..., str]]:
    """Start waitress on 127.0.0.1 on a free port with the given config; stopped after the test."""
    from dpolab.serve.server import ServerThread

    servers = []

    def start(app: Any = None, **overrides: Any) -> str:
        server = ServerThread(app if app is not None else make_app(**overrides))
        servers.append(server)
        return server.__enter__()

    yield start
    for server in servers:
        server.close()


class Gate:
    """Test-only stand-in for the engine's generate step, so a test that stops, disconnects, times
    out or fills the queue never races a fast model.

    While closed, each generation sends the real token ids of ``text`` through the real streaming
    path (AnswerSink, events, SSE) and then holds the generation open until its job is stopped:
    the Stop button's cancel, a client disconnect or the time limit (RequestStop, the check the
    real model makes after every token), or until the gate opens. With ``trickle_s`` it keeps sending
    a token every ``trickle_s`` seconds meanwhile, up to max new tokens, like a slow model that is
    still writing. Once open, generation is the real model's again.
    """

    def __init__(self, app: Any, text: str = " Once upon a time there was", trickle_s: float | None = None) -> None:
        engine = app.extensions["dpolab.engine"]
        self.real = engine.generate
        self.text = text
        self.trickle_s = trickle_s
        self.opened = threading.Event()
        self.holding = threading.Semaphore(0)  # released once per generation that reached its hold
        engine.generate = self

    def open(self) -> None:
        self.opened.set()

    def __call__(self, loaded: Any, prompt_ids: list[int], params: Any, sink: Any, stop: Any) -> None:
        if self.opened.is_set():
            return self.real(loaded, prompt_ids, params, sink, stop)
        ids = loaded.tokenizer(self.text).input_ids
        sent = 0
        for token in ids[: params.max_new_tokens]:
            sink.put_ids([token])
            sent += 1
        self.holding.release()
        # stop.check() reads the job's cancel event and deadline: the same test the real model makes.
        while not stop.check() and not self.opened.wait(self.trickle_s or 0.005):
            if self.trickle_s is not None:
                if sent >= params.max_new_tokens:
                    return  # finish "length", as the model would
                sink.put_ids([ids[sent % len(ids)]])
                sent += 1

    def wait_holding(self, count: int = 1, timeout: float = 60.0) -> None:
        for _ in range(count):
            assert self.holding.acquire(timeout=timeout), "no generation reached the gate"


def sse_events(chunks: Iterable[bytes | str]) -> Iterator[tuple[str, Any]]:
    """Parse an SSE stream, given as chunks of any size, into (event, data) pairs as they arrive;
    comments (heartbeats) are skipped, ``data: [DONE]`` comes back as the string "[DONE]"."""
    import json

    event, data, buffer = "message", "", ""
    for chunk in chunks:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n" in buffer:
            line, buffer = buffer.split("\n", 1)
            line = line.rstrip("\r")
            if not line:
                if data:
                    yield event, (data if data == "[DONE]" else json.loads(data))
                event, data = "message", ""
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data += line[6:]


def read_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())
