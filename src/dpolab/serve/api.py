"""The JSON API the page uses: generate (JSON or SSE), cancel, preferences, model info, health,
metrics."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST

from dpolab.serve import jobs
from dpolab.serve.auth import same_origin
from dpolab.serve.chat import formatter_for
from dpolab.serve.preferences import append_row, check_pair, count_rows, encode_row, preference_row
from dpolab.serve.validation import (
    BOUNDS,
    ApiError,
    SamplingParams,
    boolean,
    json_body,
    known_fields,
    messages,
    sampling_params,
    text,
)

bp = Blueprint("api", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    eng = jobs.engine()
    if eng.ready.is_set():
        return jsonify(status="ok", model=eng.models.policy.id if eng.models else None)
    status = "error" if eng.load_error else "loading"
    return jsonify(status=status, error=eng.load_error), 503, {"Retry-After": "5"}


@bp.get("/metrics")
def metrics() -> Any:
    eng = jobs.engine()
    body = eng.metrics.render(queue_depth=eng.queue_depth, active=eng.active, workers=eng.workers,
                              max_queue=eng.max_queue, ready=eng.ready.is_set())
    return Response(body, content_type=CONTENT_TYPE_LATEST)


@bp.get("/api/model")
def model_info() -> Any:
    eng = jobs.ready_engine()
    assert eng.models is not None
    config = current_app.config
    bounds = {k: dict(v) for k, v in BOUNDS.items()}
    bounds["max_new_tokens"]["max"] = config["MAX_NEW_TOKENS"]
    bounds["max_new_tokens"]["default"] = min(config["DEFAULT_MAX_NEW_TOKENS"], config["MAX_NEW_TOKENS"])
    return jsonify(**eng.models.info, bounds=bounds,
                   server={"workers": eng.workers, "max_queue": eng.max_queue,
                           "request_timeout_s": config["REQUEST_TIMEOUT_S"],
                           "preferences_file": Path(config["PREFERENCES_PATH"]).name,
                           "experiments": jobs.records_dir() is not None})


def _turns(data: dict[str, Any]) -> list[dict[str, str]]:
    prompt = text(data, "prompt")
    history = messages(data, "history") if data.get("history") is not None else []
    return [*history, {"role": "user", "content": prompt or ""}]


# What /api/generate reads: the chat, its switches, and every sampling setting sampling_params parses.
GENERATE_FIELDS = {"prompt", "history", "compare", "stream", *(f.name for f in fields(SamplingParams))}


@bp.post("/api/generate")
def generate() -> Any:
    data = json_body()
    known_fields(data, GENERATE_FIELDS)
    config = current_app.config
    params, capped = sampling_params(data, config["MAX_NEW_TOKENS"], default_max_new_tokens=config["DEFAULT_MAX_NEW_TOKENS"])
    compare = boolean(data, "compare")
    stream = boolean(data, "stream")
    if compare and jobs.ready_engine().models.reference is None:  # type: ignore[union-attr]
        raise ApiError("compare: this server has no reference model (start it with --reference BASE)",
                       param="compare", code="no_reference")
    roles = ("policy", "reference") if compare else ("policy",)
    job, meta = jobs.chat_job(_turns(data), params, "prompt", roles)
    head = {"id": job.id, **meta, "max_new_tokens": params.max_new_tokens, "max_new_tokens_capped": capped,
            "roles": list(roles)}
    disconnected = jobs.disconnect_probe()
    if not stream:
        return jsonify(_response(head, jobs.wait_result(job, disconnected)))

    def events() -> Any:
        yield jobs.sse(head, "start")
        for event in jobs.stream_events(job, disconnected):
            if event is None:
                yield ": keep-alive\n\n"
                continue
            kind, payload = event
            if kind == "result":
                yield jobs.sse(_response(head, payload), "result")
            elif kind == "error":
                yield jobs.sse({"error": {"message": payload["message"], "type": "server_error"}}, "error")
            else:
                yield jobs.sse(payload, kind)

    return jobs.sse_response(job, events())


def _response(head: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    answers = result["answers"]
    first = answers[0]
    completion = sum(a["completion_tokens"] for a in answers)
    models = jobs.engine().models
    assert models is not None
    return {**head, "model": first["model"], "text": first["text"], "finish_reason": first["finish_reason"],
            "reward": first["reward"], "beta": result["beta"], "beta_known": models.beta_known, "answers": answers,
            "usage": {"prompt_tokens": head["prompt_tokens"], "completion_tokens": completion,
                      "total_tokens": head["prompt_tokens"] + completion}}


@bp.post("/api/generate/<job_id>/cancel")
def cancel(job_id: str) -> Any:
    if not jobs.engine().cancel(job_id):
        raise ApiError(f"no running generation with id {job_id!r} (finished already?)", status=404,
                       param="id", code="not_found")
    return jsonify(cancelled=True, id=job_id)


@bp.post("/api/preference")
def preference() -> Any:
    """Append a training row (HH or conversational, as trained) for the next `dpolab train --dataset FILE`."""
    _same_origin_json()
    data = json_body()
    known_fields(data, {"prompt", "history", "chosen", "rejected"})
    turns = _turns(data)
    chosen, rejected = text(data, "chosen"), text(data, "rejected")
    path = Path(current_app.config["PREFERENCES_PATH"])
    formatter = formatter_for(jobs.ready_engine().models.policy.tokenizer)  # rows as the model was trained
    row = preference_row(turns, chosen or "", rejected or "", formatter)
    check_pair(turns, chosen or "", rejected or "", row, formatter)
    current_app.extensions["dpolab.preference_limit"].admit(path, encode_row(row))
    append_row(path, row)
    return jsonify(saved=True, file=path.name, rows=count_rows(path)), 201


def _same_origin_json() -> None:
    """Only this app's own page may write rows. A cross-site page can POST a form or text/plain
    without a CORS preflight, but not application/json; and a browser names the page's origin."""
    if request.mimetype != "application/json":
        raise ApiError(f"Content-Type must be application/json, got {request.mimetype or 'none'!r}", status=415,
                       code="unsupported_media_type")
    same_origin()
