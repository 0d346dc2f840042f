"""The real server (waitress on 127.0.0.1): streaming over HTTP, disconnect = cancel, and the
bounded load test."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .conftest import Gate, sse_events


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def healthy(url: str) -> bool:
    """/healthz says 200. While the models load, a CPU shared with other work may leave one check
    unanswered for long: that is "not yet", not a failure (wait_for's deadline decides)."""
    try:
        return get(f"{url}/healthz")[0] == 200
    except OSError:  # timed out, connection refused or reset
        return False


def post(url: str, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


def metric(url: str, name: str) -> float:
    for line in get(f"{url}/metrics")[1].splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)


def test_server_streams_tokens_over_http(live_server):
    url = urlsplit(live_server())
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    connection.request("POST", "/api/generate", json.dumps({"prompt": "hi", "max_new_tokens": 6, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Content-Security-Policy")
    # read1 returns what has arrived so far: events come one by one, not in one buffered body.
    events = list(sse_events(iter(lambda: response.read1(4096), b"")))
    assert [k for k, _ in events][0] == "start" and events[-1][0] == "result"
    result, texts = events[-1][1], [data["text"] for kind, data in events if kind == "token"]
    assert "".join(texts) == result["text"]  # the deltas add up to the answer, nothing lost or repeated
    # Token events are text deltas: a token that ends inside a UTF-8 character (the tiny random model
    # writes byte-level tokens) is held back and sent with the next one, so there can be fewer events
    # than tokens, never more.
    assert len(texts) <= result["usage"]["completion_tokens"] and (texts or not result["text"])
    assert result["usage"]["completion_tokens"] == 6 or result["finish_reason"] == "stop"
    connection.close()


def test_disconnected_client_stops_its_generation(live_server, make_app):
    app = make_app(MAX_NEW_TOKENS=512)
    Gate(app)  # held open after its first tokens: only the hang-up can end it
    url = live_server(app=app)
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", "/api/generate", json.dumps({"prompt": "go", "max_new_tokens": 512, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    for kind, _ in sse_events(iter(lambda: response.read1(4096), b"")):
        if kind == "token":
            break
    response.close()
    connection.close()  # hang up mid-answer
    wait_for(lambda: 'finish_reason="cancelled"' in get(f"{url}/metrics")[1])
    assert metric(url, "dpolab_generated_tokens_total") < 512
    assert get(f"{url}/healthz")[0] == 200


def test_close_finishes_responses_before_closing_sockets(make_app):
    """EBADF at shutdown: a request thread still writing a response when the loop closed its
    wake-up pipe got "Bad file descriptor". Closing now cancels the generation, lets the response
    finish (the client reads its last event) and ends every request thread before the sockets go."""
    from dpolab.serve.server import ServerThread

    app = make_app(MAX_NEW_TOKENS=512)
    gate = Gate(app)
    server = ServerThread(app)
    parts = urlsplit(server.__enter__())
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", "/api/generate", json.dumps({"prompt": "go", "max_new_tokens": 512, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    gate.wait_holding()
    server.close()
    events = list(sse_events(iter(lambda: response.read1(4096), b"")))
    assert events[-1][0] == "result" and events[-1][1]["finish_reason"] == "cancelled"
    assert server.server.task_dispatcher.threads == set()  # no request thread can write any more
    assert not server.running()
    connection.close()


def test_bounded_load_8_threads_x_8_requests(live_server, make_app):
    """8 client threads x 8 requests, tiny model, 2-slot queue (1 worker + 2 waiting):
    no 5xx, every request answered (200) or refused (429 + Retry-After), server still healthy."""
    app = make_app(WORKERS=1, MAX_QUEUE=2)
    # Admitted generations are held until the first 429 is seen, so the overflow is certain,
    # however fast the model or slow the clients; then the real model answers.
    gate = Gate(app)
    url = live_server(app=app)
    statuses: Counter[int] = Counter()
    problems: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(8):
            if j % 2:
                status, headers, body = post(f"{url}/v1/completions", {"prompt": f"client {i} says", "max_tokens": 3})
            else:
                status, headers, body = post(f"{url}/api/generate", {"prompt": f"request {i}.{j}", "max_new_tokens": 3})
            with lock:
                statuses[status] += 1
                if status == 200 and not ("text" in body or "choices" in body):
                    problems.append(f"200 without an answer: {body}")
                if status == 429:
                    gate.open()
                    if not headers.get("Retry-After", "").isdigit():
                        problems.append(f"429 without Retry-After: {headers}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert problems == []
    assert sum(statuses.values()) == 64 and set(statuses) <= {200, 429}, statuses
    # 8 concurrent clients against 3 slots: some are answered, the overflow is refused, not queued
    # without bound (a typical run here: 24 answered, 40 refused).
    assert statuses[200] >= 1 and statuses[429] >= 1, statuses
    assert metric(url, "dpolab_rejected_total") == statuses[429]
    assert get(f"{url}/healthz")[0] == 200
    assert metric(url, "dpolab_queue_depth") == 0
    assert post(f"{url}/api/generate", {"prompt": "still there?", "max_new_tokens": 2})[0] == 200


@contextlib.contextmanager
def serve_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen,
                                                                                        list[str]]]:
    """The real `dpolab serve ARGS` run from ``cwd``: yields (url on 127.0.0.1 once /healthz is 200,
    process, output)."""

    def like_a_terminal() -> None:
        # A shell starts background jobs with SIGINT ignored, and Python then never raises
        # KeyboardInterrupt: give the server the default Ctrl-C a terminal would.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen([sys.executable, "-m", "dpolab.cli", "serve", *args, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env,
                               preexec_fn=like_a_terminal)
    output: list[str] = []
    try:
        first = process.stdout.readline()
        match = re.search(r"listening on http://(127\.0\.0\.1|0\.0\.0\.0):(\d+)", first)
        assert match, first + process.stdout.read()
        # Keep reading: a server whose output pipe fills up blocks on its next log line.
        threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
        url = f"http://127.0.0.1:{match.group(2)}"
        wait_for(lambda: healthy(url), timeout=300)
        yield url, process, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])
def test_serve_command_starts_waitress_and_stops_on_ctrl_c(run_dir, tmp_path, stop_signal):
    """The real start-up path of `dpolab serve RUN`: listens first (healthz 503 while loading),
    then 200; Ctrl-C (SIGINT) or a service manager's SIGTERM stops it cleanly, exit code 0."""
    with serve_cli(str(run_dir), "--preferences", str(tmp_path / "prefs.jsonl"), cwd=tmp_path) as (url, process,
                                                                                                 output):
        status, _, body = post(f"{url}/api/generate", {"prompt": "hello", "max_new_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        process.send_signal(getattr(signal, stop_signal))
        try:
            assert process.wait(timeout=120) == 0
        except subprocess.TimeoutExpired:
            pytest.fail(f"dpolab serve did not stop on {stop_signal}; its output:\n" + "".join(output[-40:]))


def test_serve_command_with_relative_paths(sweep_dir):
    """`dpolab serve beta-sweep` typed in the sweep's parent folder. The plots and
    the full report answered 404 (Flask resolved the relative folder against its package root)."""
    cwd = sweep_dir.parent
    with serve_cli(sweep_dir.name, "--preferences", "prefs.jsonl", cwd=cwd) as (url, _, _):
        assert "/experiments/report/loss.png" in get(f"{url}/experiments")[1]
        with urllib.request.urlopen(f"{url}/experiments/report/loss.png", timeout=30) as response:
            assert response.status == 200 and response.read().startswith(b"\x89PNG")
        status, report = get(f"{url}/experiments/report.html")
        assert status == 200 and "<h1>Report</h1>" in report
        status, _, body = post(f"{url}/api/preference", {"prompt": "q", "chosen": "yes", "rejected": "no"})
        assert status == 201 and body["file"] == "prefs.jsonl"
        # A DNS-rebound page: its own name as Host, and as Origin. Only this machine's names are served.
        parts = urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        rebound = f"rebound.example:{parts.port}"
        connection.request("POST", "/api/preference", json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}),
                           {"Host": rebound, "Origin": f"http://{rebound}", "Content-Type": "application/json"})
        assert connection.getresponse().status == 400
        connection.close()
    assert len((cwd / "prefs.jsonl").read_text().splitlines()) == 1  # relative to where it was typed


def test_experiments_page_of_a_single_run_with_its_report(run_dir, tmp_path):
    """`dpolab report run` then `dpolab serve run`: the experiments page showed "not a sweep";
    it now shows the run's table, the report's plots and the full report."""
    import shutil

    from dpolab.cli import main

    shutil.copytree(run_dir, tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    with serve_cli("run", "--preferences", "prefs.jsonl", cwd=tmp_path) as (url, _, _):
        status, page = get(f"{url}/experiments")
        assert status == 200 and "Run <strong>tiny</strong>" in page and "<th>beta</th>" in page
        assert "/experiments/report/eval_loss.png" in page and "table.png" not in page
        with urllib.request.urlopen(f"{url}/experiments/report/eval_loss.png", timeout=30) as response:
            assert response.status == 200 and response.read().startswith(b"\x89PNG")
        status, report = get(f"{url}/experiments/report.html")
        assert status == 200 and "<html" in report.lower()
        assert get(f"{url}/api/model")[1].count('"experiments":true') == 1
