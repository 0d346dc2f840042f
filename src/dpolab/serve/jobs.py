"""Glue between HTTP requests and the engine, shared by the JSON API and the OpenAI API:
fit the prompt, submit (429 when the queue is full), then wait for or stream the job's events
while watching for a client that went away."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flask import Response, current_app, request, stream_with_context

from dpolab.serve.chat import TURN_STOPS, check_turns, fit_turns, formatter_for
from dpolab.serve.generation import Engine, Job, NotReady, QueueFull
from dpolab.serve.validation import ApiError, SamplingParams

POLL_S = 0.25  # how often a waiting response checks whether its client disconnected
HEARTBEAT_S = 2.0  # SSE comment interval while nothing happens: proxies keep the stream open
# and a write to a closed connection is how a streaming response notices a gone client.


def engine() -> Engine:
    return current_app.extensions["dpolab.engine"]


def ready_engine() -> Engine:
    eng = engine()
    if not eng.ready.is_set():
        raise ApiError(eng.load_error or "models are still loading", status=503, type_="server_error",
                       code="not_ready", headers={"Retry-After": "5"})
    return eng


def records_dir() -> Path | None:
    """The sweep or run folder the served model comes from (its records make the experiments page);
    None for an export, an adapter or a Hub model, and while loading."""
    models = engine().models
    if models is None:
        return None
    if models.sweep_dir is not None:
        return models.sweep_dir
    return Path(models.info["source"]) if models.info.get("kind") == "run" else None


def context_budget(eng: Engine, max_new_tokens: int) -> int:
    assert eng.models is not None
    context = current_app.config.get("MAX_CONTEXT") or eng.models.context_length()
    return min(context, eng.models.context_length()) - max_new_tokens


def count_tokens(eng: Engine) -> Callable[[str], int]:
    assert eng.models is not None
    tokenizer = eng.models.policy.tokenizer
    return lambda text: len(tokenizer(text).input_ids)


def chat_job(turns: list[dict[str, str]], params: SamplingParams, param: str, roles: tuple[str, ...] = ("policy",),
             drop_oldest: bool = True) -> tuple[Job, dict[str, Any]]:
    """A training-format chat job. Too long for the context: with ``drop_oldest`` the oldest turns
    are dropped to fit (reported in the returned meta), else a 400 ``context_length_exceeded``."""
    eng = ready_engine()
    check_turns(turns, param)
    prompt, n_tokens, dropped = fit_turns(turns, count_tokens(eng), context_budget(eng, params.max_new_tokens), param,
                                          formatter_for(eng.models.policy.tokenizer), drop_oldest)
    job = Job(prompt=prompt, params=params, roles=roles, stops=TURN_STOPS + params.stop,
              timeout_s=current_app.config["REQUEST_TIMEOUT_S"])
    return submit(eng, job), {"prompt_tokens": n_tokens, "truncated_turns": dropped}


def completion_job(prompt: str, params: SamplingParams, roles: tuple[str, ...]) -> tuple[Job, dict[str, Any]]:
    """A raw-text completion job: no chat template, so nothing can be dropped; too long is a 400."""
    eng = ready_engine()
    n_tokens = count_tokens(eng)(prompt)
    budget = context_budget(eng, params.max_new_tokens)
    if n_tokens > budget:
        raise ApiError(f"prompt is {n_tokens} tokens; at most {budget} fit (context minus max_tokens)",
                       param="prompt", code="context_length_exceeded")
    job = Job(prompt=prompt, params=params, roles=roles, stops=params.stop,
              timeout_s=current_app.config["REQUEST_TIMEOUT_S"])
    return submit(eng, job), {"prompt_tokens": n_tokens, "truncated_turns": 0}


def submit(eng: Engine, job: Job) -> Job:
    try:
        return eng.submit(job)
    except QueueFull as exc:
        eng.metrics.count_rejected()
        raise ApiError(f"the generation queue is full ({eng.workers} running, {eng.max_queue} waiting); "
                       f"retry in {exc.retry_after} s", status=429, type_="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    except NotReady as exc:
        raise ApiError(str(exc), status=503, type_="server_error", code="not_ready",
                       headers={"Retry-After": "5"}) from None


def disconnect_probe() -> Callable[[], bool]:
    """waitress (with channel_request_lookahead) tells a running app that its client hung up."""
    probe = request.environ.get("waitress.client_disconnected")
    return probe if callable(probe) else (lambda: False)


def wait_result(job: Job, disconnected: Callable[[], bool]) -> dict[str, Any]:
    """Block until the job's terminal event; a client that disconnects cancels its generation."""
    try:
        while True:
            event = job.next_event(POLL_S)
            # Checked on every event too, not only when none came for POLL_S: a model that keeps
            # writing would otherwise keep running for a client that is gone.
            if disconnected():
                job.cancel()
            if event is None:
                continue
            kind, data = event
            if kind == "result":
                return data
            if kind == "error":
                raise ApiError(data["message"], status=500, type_="server_error", code="generation_failed")
    finally:
        if not job.done.is_set():
            job.cancel()


def stream_events(job: Job, disconnected: Callable[[], bool]) -> Iterator[tuple[str, dict[str, Any]] | None]:
    """The job's events as they come; None now and then (a heartbeat slot) while waiting.

    Runs inside the response iterator: when the client goes away the server closes this
    generator (GeneratorExit at a yield), and the ``finally`` cancels the generation.
    """
    waited = 0.0
    try:
        while True:
            event = job.next_event(POLL_S)
            if event is None:
                waited += POLL_S
                if disconnected():
                    job.cancel()
                    return
                if waited >= HEARTBEAT_S:
                    waited = 0.0
                    yield None
                continue
            waited = 0.0
            yield event
            if event[0] in ("result", "error"):
                return
    finally:
        if not job.done.is_set():
            job.cancel()


def sse(data: Any, event: str | None = None) -> str:
    import json

    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_response(job: Job, body: Iterator[str]) -> Response:
    """A streaming response whose closing always cancels the job: the generator's own ``finally``
    does not run when the server closes the response before ever iterating it."""
    response = Response(stream_with_context(body), mimetype="text/event-stream", headers=SSE_HEADERS)
    response.call_on_close(job.cancel)  # harmless once the job is done
    return response
