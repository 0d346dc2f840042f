"""Request validation: every bad field becomes a 400 whose JSON error names the field.

One error shape is used by both APIs, OpenAI's (``{"error": {"message", "type", "param", "code"}}``),
so the official ``openai`` client turns our errors into its typed exceptions and the page can show
``error.message`` whatever endpoint it called.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dpolab.hh import SAMPLING


class ApiError(Exception):
    """An error answered as JSON. ``param`` names the offending request field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type_
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def json_body() -> dict[str, Any]:
    """The request's JSON object. Reading the body enforces MAX_CONTENT_LENGTH (413), whatever
    the Content-Type, so a client that forgets the header still gets a useful answer."""
    import json

    from flask import request

    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError("request body must be a JSON object", code="invalid_json")
    return data


def _number(data: dict[str, Any], name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = data.get(name, default)
    if value is None:
        return default
    # bool is an int subclass in Python: `"temperature": true` must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(f"{name} must be a number, got {value!r}", param=name, code="invalid_type")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        left = "(" if low_open else "["
        raise ApiError(f"{name} must be in {left}{low}, {high}], got {value!r}", param=name, code="out_of_range")
    return float(value)


def _integer(data: dict[str, Any], name: str, default: int | None, low: int, high: int | None) -> int | None:
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{name} must be an integer, got {value!r}", param=name, code="invalid_type")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ApiError(f"{name} must be {bound}, got {value!r}", param=name, code="out_of_range")
    return value


def boolean(data: dict[str, Any], name: str, default: bool = False) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false, got {value!r}", param=name, code="invalid_type")
    return value


def text(data: dict[str, Any], name: str, required: bool = True) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise ApiError(f"{name} is required", param=name, code="missing_field")
        return None
    if not isinstance(value, str):
        raise ApiError(f"{name} must be a string, got {type(value).__name__}", param=name, code="invalid_type")
    if required and not value.strip():
        raise ApiError(f"{name} must not be empty", param=name, code="empty_field")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request. temperature 0 means greedy decoding."""

    temperature: float = SAMPLING["temperature"]
    top_p: float = SAMPLING["top_p"]
    top_k: int = SAMPLING["top_k"]
    max_new_tokens: int = SAMPLING["max_new_tokens"]
    repetition_penalty: float = SAMPLING["repetition_penalty"]
    stop: tuple[str, ...] = field(default_factory=tuple)


# The bounds the page's inputs use too (served by /api/model), so browser and server agree.
BOUNDS: dict[str, dict[str, float]] = {
    "temperature": {"min": 0.0, "max": 2.0, "step": 0.05, "default": SAMPLING["temperature"]},
    "top_p": {"min": 0.01, "max": 1.0, "step": 0.01, "default": SAMPLING["top_p"]},
    "top_k": {"min": 0, "max": 1000, "step": 1, "default": SAMPLING["top_k"]},
    "max_new_tokens": {"min": 1, "max": 4096, "step": 1, "default": SAMPLING["max_new_tokens"]},
    "repetition_penalty": {"min": 1.0, "max": 2.0, "step": 0.05, "default": SAMPLING["repetition_penalty"]},
}


def stop_strings(data: dict[str, Any], name: str = "stop") -> tuple[str, ...]:
    value = data.get(name)
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values) or len(values) > 4:
        raise ApiError(f"{name} must be a non-empty string or a list of at most 4 non-empty strings",
                       param=name, code="invalid_type")
    return tuple(values)


def sampling_params(data: dict[str, Any], max_new_tokens_cap: int, max_tokens_key: str = "max_new_tokens",
                    default_max_new_tokens: int = 128) -> tuple[SamplingParams, bool]:
    """Parse and bound-check the sampling fields. Returns the params and whether max new tokens was
    lowered to the server's cap (the cap is server policy, so exceeding it is not the client's error)."""
    requested = _integer(data, max_tokens_key, min(default_max_new_tokens, max_new_tokens_cap), 1, None)
    assert requested is not None
    capped = requested > max_new_tokens_cap
    b = BOUNDS
    params = SamplingParams(
        temperature=_number(data, "temperature", b["temperature"]["default"], 0.0, b["temperature"]["max"]),
        top_p=_number(data, "top_p", b["top_p"]["default"], 0.0, 1.0, low_open=True),
        top_k=int(_integer(data, "top_k", int(b["top_k"]["default"]), 0, int(b["top_k"]["max"])) or 0),
        max_new_tokens=min(requested, max_new_tokens_cap),
        repetition_penalty=_number(data, "repetition_penalty", b["repetition_penalty"]["default"],
                                   b["repetition_penalty"]["min"], b["repetition_penalty"]["max"]),
        stop=stop_strings(data),
    )
    return params, capped


def messages(data: dict[str, Any], name: str = "messages") -> list[dict[str, str]]:
    """A chat history: a list of ``{"role": "user"|"assistant"|"system", "content": str}``."""
    value = data.get(name)
    if not isinstance(value, list):
        raise ApiError(f"{name} must be a list of {{role, content}} objects", param=name, code="invalid_type")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant", "system") \
                or not isinstance(item.get("content"), str):
            raise ApiError(f"{name}[{i}] must be {{\"role\": \"user\"|\"assistant\"|\"system\", \"content\": str}}",
                           param=f"{name}[{i}]", code="invalid_type")
        out.append({"role": item["role"], "content": item["content"]})
    return out
