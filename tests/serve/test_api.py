"""JSON API and page through the Flask test client: every endpoint and every error it answers."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from dpolab.serve.chat import ASSISTANT

from .conftest import Gate, sse_events


def wait_idle(app, timeout: float = 30.0) -> None:
    engine = app.extensions["dpolab.engine"]
    deadline = time.monotonic() + timeout
    while engine.active or engine.queue_depth:
        assert time.monotonic() < deadline, "engine never went idle"
        time.sleep(0.02)


def metric(client, name: str) -> float:
    for line in client.get("/metrics").get_data(as_text=True).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_healthz_ok_and_model_info(client):
    assert client.get("/healthz").json["status"] == "ok"
    info = client.get("/api/model").json
    assert info["base_model"] == "tiny-gpt2" and info["reference"] == "tiny-gpt2"
    assert info["dataset"] == "hh-rlhf-sample" and info["beta"] == 0.1
    assert info["hyperparameters"]["beta"] == 0.1 and "learning_rate" in info["hyperparameters"]
    assert set(info["eval"]) >= {"loss", "rewards/accuracies", "rewards/margins"}
    assert info["bounds"]["max_new_tokens"]["max"] == 64 and info["compare"] is True


def test_healthz_503_until_models_loaded(monkeypatch, served, tmp_path):
    from dpolab.serve import create_app

    release = threading.Event()

    def slow_loader(model, reference, precision):
        release.wait(30)
        return served

    monkeypatch.setattr("dpolab.serve.models.load_served_models", slow_loader)
    app = create_app({"MODEL": "anything", "PREFERENCES_PATH": str(tmp_path / "p.jsonl")})
    client = app.test_client()
    try:
        response = client.get("/healthz")
        assert response.status_code == 503 and response.json["status"] == "loading"
        blocked = client.post("/api/generate", json={"prompt": "hi"})
        assert blocked.status_code == 503 and "Retry-After" in blocked.headers
        release.set()
        assert app.extensions["dpolab.engine"].ready.wait(30)
        assert client.get("/healthz").status_code == 200
    finally:
        release.set()
        app.extensions["dpolab.engine"].close()


def test_healthz_reports_load_failure(monkeypatch, tmp_path):
    from dpolab.errors import DpolabError
    from dpolab.serve import create_app

    def failing(model, reference, precision):
        raise DpolabError("could not load model 'nope'")

    monkeypatch.setattr("dpolab.serve.models.load_served_models", failing)
    app = create_app({"MODEL": "nope", "LOAD_IN_BACKGROUND": False})
    response = app.test_client().get("/healthz")
    assert response.status_code == 503 and response.json["status"] == "error"
    assert "nope" in response.json["error"]


def test_generate_json(client):
    response = client.post("/api/generate", json={"prompt": "Hello?", "max_new_tokens": 5})
    assert response.status_code == 200
    body = response.json
    assert isinstance(body["text"], str) and body["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 5
    assert body["usage"]["prompt_tokens"] == body["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert isinstance(body["reward"], float) and body["truncated_turns"] == 0


def test_generate_stream_sends_tokens_then_result(client):
    response = client.post("/api/generate", json={"prompt": "Tell me a story", "max_new_tokens": 6, "stream": True})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = list(sse_events([response.get_data(as_text=True)]))
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "result" and "token" in kinds
    streamed = "".join(data["text"] for kind, data in events if kind == "token")
    assert streamed == events[-1][1]["text"]  # the streamed pieces add up to the answer


def test_compare_rewards_are_dpo_implicit_rewards(client, served):
    """Recompute beta * (log pi(y|x) - log pi_ref(y|x)) with a plain forward pass and log_softmax."""
    import torch

    from dpolab.serve.chat import format_answer

    body = client.post("/api/generate", json={"prompt": "Is the sky blue?", "max_new_tokens": 5,
                                              "compare": True, "temperature": 0}).json
    assert [a["role"] for a in body["answers"]] == ["policy", "reference"]
    assert body["answers"][1]["model"] == "tiny-gpt2"
    tokenizer = served.policy.tokenizer
    prompt_ids = tokenizer(f"\n\nHuman: Is the sky blue?{ASSISTANT}").input_ids
    for answer in body["answers"]:
        answer_ids = tokenizer(format_answer(answer["text"])).input_ids + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + answer_ids])
        logps = []
        for model in (served.policy.model, served.reference.model):
            with torch.no_grad():
                logits = model(ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            logps.append(logits.gather(1, targets[:, None])[len(prompt_ids) - 1:].sum().item())
        assert answer["reward"] == pytest.approx(served.beta * (logps[0] - logps[1]), abs=1e-3)
    assert body["answers"][0]["reward"] != 0  # the policy differs from its reference


@pytest.mark.parametrize("payload, field", [
    ({}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "temperature": True}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "top_k": 2.5}, "top_k"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": "10"}, "max_new_tokens"),
    ({"prompt": "hi", "repetition_penalty": 0.5}, "repetition_penalty"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": "hi", "compare": 1}, "compare"),
    ({"prompt": "hi", "stop": ["", "x"]}, "stop"),
    ({"prompt": "hi", "history": "earlier"}, "history"),
    ({"prompt": "hi", "history": [{"role": "robot", "content": "x"}]}, "history[0]"),
])
def test_generate_validation_names_the_field(client, payload, field):
    response = client.post("/api/generate", json=payload)
    assert response.status_code == 400
    error = response.json["error"]
    assert error["param"] == field and field.split("[")[0] in error["message"]


def test_bad_json_and_non_object(client):
    assert client.post("/api/generate", data="{nope", content_type="application/json").status_code == 400
    response = client.post("/api/generate", json=[1, 2])
    assert response.status_code == 400 and "JSON object" in response.json["error"]["message"]


def test_body_over_64kb_is_413(client):
    response = client.post("/api/generate", json={"prompt": "x" * (65 * 1024)})
    assert response.status_code == 413 and "byte limit" in response.json["error"]["message"]


def test_max_new_tokens_capped_by_server(client):
    body = client.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 10_000, "temperature": 0,
                                              "stream": False}).json
    assert body["max_new_tokens"] == 64 and body["max_new_tokens_capped"] is True
    assert body["usage"]["completion_tokens"] <= 64


def test_oldest_turns_dropped_to_fit(make_app):
    client = make_app(MAX_CONTEXT=48).test_client()
    history = [{"role": "user", "content": "first question " * 10}, {"role": "assistant", "content": "answer " * 10},
               {"role": "user", "content": "second question"}, {"role": "assistant", "content": "ok"}]
    body = client.post("/api/generate", json={"prompt": "last one", "history": history, "max_new_tokens": 4}).json
    assert body["truncated_turns"] >= 2 and body["prompt_tokens"] <= 48 - 4
    too_long = client.post("/api/generate", json={"prompt": "word " * 60, "max_new_tokens": 4})
    assert too_long.status_code == 400
    assert too_long.json["error"]["param"] == "prompt"
    assert too_long.json["error"]["code"] == "context_length_exceeded"


def _first_token(response) -> tuple[str, list]:
    """Read a streamed response until its first token; returns (job id, events so far)."""
    events, job_id = [], None
    for kind, data in sse_events(response.response):
        events.append((kind, data))
        if kind == "start":
            job_id = data["id"]
        if kind == "token":
            return job_id, events
    raise AssertionError(f"no token event: {events}")


def test_stop_cancels_generation_on_server(make_app):
    app = make_app(MAX_NEW_TOKENS=512)
    Gate(app)  # held open after its first tokens until the cancel arrives
    client = app.test_client()
    response = client.post("/api/generate", json={"prompt": "go", "max_new_tokens": 512, "stream": True,
                                                  "temperature": 1.0}, buffered=False)
    job_id, _ = _first_token(response)
    assert client.post(f"/api/generate/{job_id}/cancel").json["cancelled"] is True
    rest = list(sse_events(response.response))
    result = rest[-1][1]
    assert rest[-1][0] == "result" and result["finish_reason"] == "cancelled"
    assert result["usage"]["completion_tokens"] < 512
    assert client.post(f"/api/generate/{job_id}/cancel").status_code == 404  # finished: nothing to cancel


def test_client_disconnect_cancels_generation(make_app):
    app = make_app(MAX_NEW_TOKENS=512)
    Gate(app)
    client = app.test_client()
    response = client.post("/api/generate", json={"prompt": "go", "max_new_tokens": 512, "stream": True},
                           buffered=False)
    _first_token(response)
    response.close()  # what the WSGI server does when the client goes away
    wait_idle(app)
    assert 'dpolab_generations_total{finish_reason="cancelled"} 1' in client.get("/metrics").get_data(as_text=True)


def test_full_queue_answers_429_with_retry_after(make_app):
    app = make_app(WORKERS=1, MAX_QUEUE=1, MAX_NEW_TOKENS=512)
    gate = Gate(app)  # the running job holds its worker until cancelled
    client = app.test_client()
    body = {"prompt": "go", "max_new_tokens": 512, "stream": True}
    running = client.post("/api/generate", json=body, buffered=False)
    running_id, _ = _first_token(running)
    queued = client.post("/api/generate", json=body, buffered=False)
    assert queued.status_code == 200 and app.extensions["dpolab.engine"].queue_depth == 1
    refused = client.post("/api/generate", json={**body, "stream": False})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json["error"]["code"] == "queue_full"
    assert metric(client, "dpolab_rejected_total") == 1
    client.post(f"/api/generate/{running_id}/cancel")
    queued.close()  # closed before its body was ever read: must still cancel its queued job
    running.close()
    wait_idle(app)
    assert 'dpolab_generations_total{finish_reason="cancelled"} 2' in client.get("/metrics").get_data(as_text=True)
    gate.open()
    assert client.post("/api/generate", json={"prompt": "again", "max_new_tokens": 2}).status_code == 200


def test_request_time_limit(make_app):
    app = make_app(REQUEST_TIMEOUT_S=0.05, MAX_NEW_TOKENS=512)
    Gate(app)  # never finishes on its own: only the time limit can end it
    client = app.test_client()
    body = client.post("/api/generate", json={"prompt": "go", "max_new_tokens": 512}).json
    assert body["finish_reason"] == "time_limit" and body["usage"]["completion_tokens"] < 512


def test_metrics_prometheus_text(client):
    client.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 3})
    response = client.get("/metrics")
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert 'dpolab_requests_total{endpoint="/api/generate",status="200"} 1' in text
    assert metric(client, "dpolab_generated_tokens_total") >= 1
    assert metric(client, "dpolab_queue_depth") == 0 and metric(client, "dpolab_tokens_per_second") > 0
    assert "# TYPE dpolab_generated_tokens_total counter" in text


def test_preference_row_is_hh_format(app, client):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    response = client.post("/api/preference", json={"prompt": "Help me", "history": history,
                                                    "chosen": "Sure, happy to.", "rejected": "No."})
    assert response.status_code == 201 and response.json["rows"] == 1
    row = json.loads(Path(app.config["PREFERENCES_PATH"]).read_text())
    assert set(row) == {"chosen", "rejected"}
    assert row["chosen"] == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me\n\nAssistant: Sure, happy to."
    prompt_c, answer_c = row["chosen"].rsplit(ASSISTANT, 1)
    prompt_r, answer_r = row["rejected"].rsplit(ASSISTANT, 1)
    assert prompt_c == prompt_r and answer_r == " No."
    # What `dpolab train --dataset FILE` does with the file: every row becomes a pair, none dropped.
    from dpolab.data import DataReport, read_jsonl, to_pair

    rows = read_jsonl(Path(app.config["PREFERENCES_PATH"]), DataReport(source="preferences"))
    pair, reason = to_pair(rows[0])
    assert reason is None and pair["chosen"] == " Sure, happy to." and pair["rejected"] == " No."
    missing = client.post("/api/preference", json={"prompt": "x", "chosen": "a"})
    assert missing.status_code == 400 and missing.json["error"]["param"] == "rejected"


def test_preference_appends_are_atomic_under_concurrency(app):
    long_answer = "word " * 2000  # ~10 KB lines: larger than a pipe buffer, would tear if split
    errors = []

    def click(i: int) -> None:
        response = app.test_client().post("/api/preference", json={"prompt": f"q{i}", "chosen": long_answer,
                                                                   "rejected": f"no {i}"})
        if response.status_code != 201:
            errors.append(response.status_code)

    threads = [threading.Thread(target=click, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    lines = Path(app.config["PREFERENCES_PATH"]).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 16 and sorted(r["rejected"].rsplit(" ", 1)[1] for r in rows) == sorted(map(str, range(16)))


def test_page_is_self_contained_with_csp(client):
    page = client.get("/")
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "object-src 'none'" in csp and "unsafe-inline" not in csp
    html = page.get_data(as_text=True)
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert "<script>" not in html  # no inline script (CSP would block it anyway)
    for asset in ("app.js", "app.css", "theme.js", "favicon.svg"):
        assert client.get(f"/static/{asset}").status_code == 200
    js = client.get("/static/app.js").get_data(as_text=True)
    assert ".innerHTML" not in js and "insertAdjacentHTML" not in js and "textContent" in js


def test_unknown_api_routes_are_json(client):
    response = client.get("/api/nope")
    assert response.status_code == 404 and response.json["error"]["type"] == "invalid_request_error"
    assert client.get("/api/generate").status_code == 405


def test_experiments_page_without_run_records(make_app, run_dir):
    from dpolab.serve.models import load_served_models

    client = make_app(MODELS=load_served_models(str(run_dir / "model"))).test_client()  # an export folder
    assert "does not come from a run or sweep folder" in client.get("/experiments").get_data(as_text=True)
    assert client.get("/api/model").json["server"]["experiments"] is False
    assert client.get("/experiments/report/loss.png").status_code == 404


def test_two_workers_generate_concurrently(make_app):
    """WORKERS=2: both workers are inside generate() on the same shared models at once, and every
    answer arrives. Each generation waits at a barrier for the other one: workers that took the
    jobs one after the other would leave the first waiting until the barrier's timeout (a 500)."""
    app = make_app(WORKERS=2, MAX_QUEUE=2)
    engine = app.extensions["dpolab.engine"]
    real, meeting = engine.generate, threading.Barrier(2, timeout=60)

    def generate_together(loaded, prompt_ids, params, sink, stop):
        meeting.wait()  # raises BrokenBarrierError unless the other worker arrives meanwhile
        return real(loaded, prompt_ids, params, sink, stop)

    engine.generate = generate_together
    results: list[tuple[int, list[str]]] = []

    def ask(i: int) -> None:
        response = app.test_client().post("/api/generate", json={"prompt": f"q{i}", "max_new_tokens": 4,
                                                                 "compare": True})
        results.append((response.status_code, [a["role"] for a in response.json.get("answers", [])]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Policy with policy, then reference with reference: two meetings, four generations.
    assert results == [(200, ["policy", "reference"])] * 2
    assert not meeting.broken


def test_int8_precision_serves_answers_with_rewards(run_dir, make_app):
    """`dpolab serve --precision int8` (dpolab.generate's 2x faster decode): both models are
    quantised, answers stream as usual and rewards are still computed (from the packed head)."""
    import torch

    from dpolab.serve.models import load_served_models

    served_int8 = load_served_models(str(run_dir), precision="int8")
    assert isinstance(served_int8.policy.model.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    assert served_int8.info["precision"] == "int8"
    client = make_app(MODELS=served_int8).test_client()
    body = client.post("/api/generate", json={"prompt": "Is the sky blue?", "max_new_tokens": 5,
                                              "compare": True, "temperature": 0}).json
    assert [a["role"] for a in body["answers"]] == ["policy", "reference"]
    assert all(isinstance(a["reward"], float) and a["text"] for a in body["answers"])
