"""OpenAI-compatible endpoints, so existing clients (the official ``openai`` package, LangChain,
curl scripts) can talk to a dpolab model: /v1/models, /v1/completions, /v1/chat/completions.

Nothing is changed or ignored without telling: ``n`` must be 1, ``logprobs``, ``echo``, penalties,
tools, ``response_format`` and the other features in UNSUPPORTED must be absent or at their no-op
value, any other parameter this server does not know is refused, ``max_tokens`` over the server's
cap is refused rather than lowered, and a conversation longer than the context is OpenAI's 400
``context_length_exceeded`` rather than trimmed (each a 400 naming the field, as OpenAI answers).
Only fields that change nothing about the answer (IGNORED: ``user``, ``metadata``...) are ignored,
as OpenAI-compatible servers commonly do. ``seed`` fixes the sampling; ``top_k`` and
``repetition_penalty`` are accepted as extensions, and ``truncate_turns: true`` drops the oldest
turns to fit the context, reported as ``truncated_turns`` in the response.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, jsonify

from dpolab.serve import jobs
from dpolab.serve.generation import Job
from dpolab.serve.validation import ApiError, SamplingParams, boolean, json_body, messages, sampling_params

bp = Blueprint("openai", __name__, url_prefix="/v1")

# OpenAI's own defaults, not the page's: a client that sends nothing gets what it would get there.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", "time_limit": "length"}
# Features this server does not implement -> the values that ask for nothing (accepted).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]),
}
# Parameters that change nothing about the answer (bookkeeping, routing, caching hints).
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
# What each endpoint honours; anything else (``min_p``, a typo) is refused by name.
ACCEPTED = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n",
            "top_k", "repetition_penalty", *UNSUPPORTED, *IGNORED}
COMPLETION_FIELDS = ACCEPTED | {"prompt"}
CHAT_FIELDS = ACCEPTED | {"messages", "max_completion_tokens", "truncate_turns"}


@bp.get("/models")
def list_models() -> Any:
    eng = jobs.ready_engine()
    assert eng.models is not None
    models = [m for m in (eng.models.policy, eng.models.reference) if m is not None]
    return jsonify(object="list", data=[{"id": m.id, "object": "model", "created": 0, "owned_by": "dpolab"}
                                        for m in models])


def _common(data: dict[str, Any], default_max_tokens: int, accepted: set[str]) -> tuple[SamplingParams, str, bool,
                                                                                         bool]:
    from flask import current_app

    unknown = sorted(set(data) - accepted)
    if unknown:
        raise ApiError(f"unsupported parameter(s) {', '.join(unknown)}: this server does not implement "
                       f"{'them' if len(unknown) > 1 else 'it'}; leave {'them' if len(unknown) > 1 else 'it'} out",
                       param=unknown[0], code="unsupported_parameter")
    n = data.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(f"n must be 1: this server generates one choice per request, got {n!r}", param="n",
                       code="unsupported_value")
    for name, no_op in UNSUPPORTED.items():
        value = data.get(name)
        # `True == 1` in Python: a bool matches only a bool, so `"best_of": true` is not taken for 1
        # (while `"presence_penalty": 0.0` still matches 0).
        if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in no_op):
            raise ApiError(f"{name} is not supported by this server (got {value!r}); leave it out",
                           param=name, code="unsupported_value")
    merged = {**OPENAI_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
    tokens_key = "max_completion_tokens" if "max_tokens" not in merged and "max_completion_tokens" in merged \
        else "max_tokens"
    cap = current_app.config["MAX_NEW_TOKENS"]
    params, capped = sampling_params(merged, cap, max_tokens_key=tokens_key, default_max_new_tokens=default_max_tokens)
    if capped:  # OpenAI refuses more than a model can write, and so does this server past its cap
        raise ApiError(f"{tokens_key} is too large: {merged[tokens_key]}. This server writes at most {cap} tokens "
                       "per answer (dpolab serve --max-new-tokens)", param=tokens_key, code="invalid_value")
    model_id = data.get("model")
    if model_id is not None and not isinstance(model_id, str):
        raise ApiError("model must be a string", param="model", code="invalid_type")
    eng = jobs.ready_engine()
    assert eng.models is not None
    loaded = eng.models.by_id(model_id)
    if loaded is None:
        raise ApiError(f"model {model_id!r} does not exist; GET /v1/models lists the served models",
                       status=404, param="model", code="model_not_found")
    role = "policy" if loaded is eng.models.policy else "reference"
    stream = boolean(data, "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("stream_options must be an object", param="stream_options", code="invalid_type")
    include_usage = boolean(options, "include_usage")
    return params, role, stream, include_usage


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@bp.post("/completions")
def completions() -> Any:
    data = json_body()
    params, role, stream, include_usage = _common(data, default_max_tokens=16, accepted=COMPLETION_FIELDS)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError("prompt must be a string (or a list of exactly one string)", param="prompt",
                       code="invalid_type")
    if not prompt:
        raise ApiError("prompt must not be empty", param="prompt", code="empty_field")
    job, meta = jobs.completion_job(prompt, params, (role,))
    return _respond(job, meta, stream, include_usage, chat=False)


@bp.post("/chat/completions")
def chat_completions() -> Any:
    data = json_body()
    params, role, stream, include_usage = _common(data, default_max_tokens=128, accepted=CHAT_FIELDS)
    truncate = boolean(data, "truncate_turns")
    raw = data.get("messages")
    if isinstance(raw, list):  # content may be a list of text parts: join them
        raw = [{**m, "content": _text_parts(m["content"], f"messages[{i}].content")}
               if isinstance(m, dict) and isinstance(m.get("content"), list) else m for i, m in enumerate(raw)]
    turns = messages({"messages": raw}, "messages")
    job, meta = jobs.chat_job(turns, params, "messages", (role,), drop_oldest=truncate)
    return _respond(job, meta, stream, include_usage, chat=True,
                    extra={"truncated_turns": meta["truncated_turns"]} if truncate else {})


def _text_parts(parts: list[Any], param: str) -> str:
    """OpenAI's ``[{"type": "text", "text": "..."}]`` content; other part types (images, audio) are
    refused, not dropped: answering without them would answer a different question."""
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(f"{param}[{j}]: only text parts are supported, got {kind!r}", param=f"{param}[{j}]",
                           code="unsupported_value")
        if not isinstance(part.get("text"), str):
            raise ApiError(f"{param}[{j}].text must be a string, got {type(part.get('text')).__name__}",
                           param=f"{param}[{j}].text", code="invalid_type")
        texts.append(part["text"])
    return "".join(texts)


def _respond(job: Job, meta: dict[str, Any], stream: bool, include_usage: bool, chat: bool,
             extra: dict[str, Any] | None = None) -> Any:
    """``extra``: fields of our own extensions, in the response (and every chunk) beside OpenAI's."""
    created = int(time.time())
    prefix, obj = ("chatcmpl-", "chat.completion") if chat else ("cmpl-", "text_completion")
    base = {"id": prefix + job.id, "object": obj + (".chunk" if chat and stream else ""), "created": created,
            **(extra or {})}
    disconnected = jobs.disconnect_probe()
    if not stream:
        answer = jobs.wait_result(job, disconnected)["answers"][0]
        finish = FINISH[answer["finish_reason"]]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": answer["text"].strip()},
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": answer["text"], "logprobs": None, "finish_reason": finish}
        return jsonify(**base, model=answer["model"], choices=[choice],
                       usage=_usage(meta["prompt_tokens"], answer["completion_tokens"]))

    models = jobs.engine().models
    assert models is not None
    loaded = models.policy if job.roles[0] == "policy" else models.reference
    assert loaded is not None
    model_id = loaded.id

    def chunk(delta: str | None, finish: str | None) -> str:
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": {} if delta is None else {"content": delta},
                                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return jobs.sse({**base, "model": model_id, "choices": [choice]})

    def events() -> Any:
        if chat:  # OpenAI's first chunk announces the role
            yield jobs.sse({**base, "model": model_id,
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
        started = False
        for event in jobs.stream_events(job, disconnected):
            if event is None:
                yield ": keep-alive\n\n"
                continue
            kind, payload = event
            if kind == "token":
                piece = payload["text"]
                if chat and not started:  # the HH format puts a space after "Assistant:"
                    piece = piece.lstrip()
                    if not piece:
                        continue
                started = True
                yield chunk(piece, None)
            elif kind == "result":
                answer = payload["answers"][0]
                yield chunk(None, FINISH[answer["finish_reason"]])
                if include_usage:
                    yield jobs.sse({**base, "model": model_id, "choices": [],
                                    "usage": _usage(meta["prompt_tokens"], answer["completion_tokens"])})
            elif kind == "error":
                yield jobs.sse({"error": {"message": payload["message"], "type": "server_error",
                                          "param": None, "code": "generation_failed"}})
        yield "data: [DONE]\n\n"

    return jobs.sse_response(job, events())
