"""Preference capture: the person's "this answer is better" becomes a training row in the format the
model was trained on, exactly what ``dpolab train --dataset FILE`` reads for the next DPO round.

HH runs get ``{"chosen": dialogue, "rejected": dialogue}`` (the same prompt dialogue followed by
each answer); chat-template runs get TRL's conversational row ``{"prompt": messages, "chosen":
[assistant message], "rejected": [assistant message]}``.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any

from dpolab.data.templates import Formatter
from dpolab.serve.chat import ASSISTANT, HH, dialogue, format_answer

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


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line atomically.

    The whole line goes out in one ``write(2)`` on an ``O_APPEND`` descriptor, under a thread lock
    (threads of this server) and an exclusive ``flock`` (other processes appending to the same
    file), so concurrent clicks never interleave or tear lines.
    """
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
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
