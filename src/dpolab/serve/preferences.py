"""Preference capture: the person's "this answer is better" becomes a training row in the format the
model was trained on, exactly what ``dpolab train --dataset FILE`` reads for the next DPO round.

HH runs get ``{"chosen": dialogue, "rejected": dialogue}`` (the same prompt dialogue followed by
each answer); chat-template runs get TRL's conversational row ``{"prompt": messages, "chosen":
[assistant message], "rejected": [assistant message]}``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from dpolab.data.formats import adapt
from dpolab.data.templates import Formatter
from dpolab.serve.chat import ASSISTANT, HH, TURN_STOPS, dialogue, format_answer
from dpolab.serve.validation import ApiError

_lock = threading.Lock()


def preference_row(turns: list[dict[str, str]], chosen: str, rejected: str,
                   formatter: Formatter = HH) -> dict[str, Any]:
    if formatter.is_chat:
        return {"prompt": [{"role": t["role"], "content": t["content"]} for t in turns],
                "chosen": [{"role": "assistant", "content": chosen.strip()}],
                "rejected": [{"role": "assistant", "content": rejected.strip()}]}
    prompt = dialogue(turns)
    assert prompt.endswith(ASSISTANT)
    return {"chosen": prompt + format_answer(chosen), "rejected": prompt + format_answer(rejected)}


def template_markers(formatter: Formatter) -> list[str]:
    """Strings that delimit turns for a chat-template model: its special tokens (``<|im_end|>``...)
    and the text the template puts around each message (``[/INST]``...), longest first."""
    tokenizer = formatter.tokenizer
    markers = set(tokenizer.all_special_tokens)
    markers.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    # Render a dialogue of placeholder messages: what lies between the placeholders is the template's.
    # Only short lines are markers (``<|im_start|>user``, ``### User:``); a default system prompt
    # that some templates insert is a sentence, not a marker.
    placeholders = ("dpolabUserText", "dpolabAssistantText")
    rendered = formatter.full([{"role": "user", "content": placeholders[0]}], placeholders[1])
    if all(p in rendered for p in placeholders):
        pieces = rendered.replace(placeholders[1], placeholders[0]).split(placeholders[0])
        markers.update(line.strip() for piece in pieces for line in piece.splitlines() if len(line.split()) <= 2)
    return sorted((m for m in markers if m), key=len, reverse=True)


def check_pair(turns: list[dict[str, str]], chosen: str, rejected: str, row: dict[str, Any],
               formatter: Formatter = HH) -> None:
    """Refuse (400 naming the field) a pair that ``dpolab train --dataset`` would drop, or learn
    nothing from: the file must hold only rows the next round trains on.

    No text may hold a turn marker: an HH answer with ``\n\nHuman:`` is split there by the loader,
    and a chat model's ``<|im_end|>`` inside a message would be its real end-of-turn token once
    tokenized, so the row would teach a turn the person never wrote.
    """
    texts = [("chosen", chosen), ("rejected", rejected)]
    if formatter.is_chat:  # the prompt's messages go through the template too
        *history, last = turns
        texts += [(f"history[{i}].content", t["content"]) for i, t in enumerate(history)] + [("prompt", last["content"])]
    markers, kind = (template_markers(formatter), "chat template marker") if formatter.is_chat \
        else (list(TURN_STOPS), "turn marker")
    for name, text in texts:
        marker = next((m for m in markers if m in text), None)
        if marker is not None:
            raise ApiError(f"{name} holds the {kind} {marker!r}; a message cannot contain a dialogue turn",
                           param=name, code="invalid_value")
    if chosen.strip() == rejected.strip():
        raise ApiError("chosen and rejected are the same answer: such a pair teaches DPO nothing", param="rejected",
                       code="invalid_value")
    # exactly the check the data loader makes on a row of this format
    _, reason = adapt(row, "conversational" if formatter.is_chat else "hh", chat=formatter.is_chat)
    if reason is not None:
        raise ApiError(f"the training data loader would drop this pair ({reason})", param="prompt",
                       code="invalid_value")


class GrowthLimit:
    """Caps on the preferences file: bytes per row, rows per minute, and the file's total size, so
    no client (a script, or a page that got around the Origin check) can fill the disk."""

    def __init__(self, max_row_bytes: int, rows_per_minute: int, max_file_bytes: int) -> None:
        self.max_row_bytes, self.rows_per_minute, self.max_file_bytes = max_row_bytes, rows_per_minute, max_file_bytes
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def admit(self, path: Path, data: bytes) -> None:
        if len(data) > self.max_row_bytes:
            raise ApiError(f"the preference row is {len(data)} bytes; at most {self.max_row_bytes} are kept",
                           status=413, code="row_too_large")
        size = path.stat().st_size if path.exists() else 0
        if size + len(data) > self.max_file_bytes:
            raise ApiError(f"{path.name} has reached its {self.max_file_bytes} byte cap; train on it and start "
                           "a new file (--preferences)", status=507, code="file_full")
        now = time.monotonic()
        with self._lock:
            while self._times and self._times[0] <= now - 60:
                self._times.popleft()
            if len(self._times) >= self.rows_per_minute:
                retry = max(1, math.ceil(self._times[0] + 60 - now))
                raise ApiError(f"at most {self.rows_per_minute} preferences a minute; retry in {retry} s",
                               status=429, type_="rate_limit_error", code="rate_limited",
                               headers={"Retry-After": str(retry)})
            self._times.append(now)


def encode_row(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode()


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line atomically.

    The whole line goes out in one ``write(2)`` on an ``O_APPEND`` descriptor, under a thread lock
    (threads of this server) and an exclusive ``flock`` (other processes appending to the same
    file), so concurrent clicks never interleave or tear lines.
    """
    data = encode_row(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            written = os.write(fd, data)
            if written != len(data):  # a short write would tear the line: fail loudly instead
                raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the flock


def count_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open() as handle:
        return sum(1 for line in handle if line.strip())
