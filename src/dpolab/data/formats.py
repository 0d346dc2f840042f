"""Preference-data layouts -> one internal pair, detected from the columns (or forced).

Every adapter turns a row into the same pair: either *text* (``prompt`` and the two answers as
strings, used as they are) or *messages* (the prompt as ``{role, content}`` messages and the two
answers as assistant contents, rendered later by the run's :class:`~dpolab.data.templates.Formatter`).

* ``hh``: two full dialogues, split at the LAST ``\\n\\nAssistant:`` (the prompt keeps it).
* ``explicit``: ``prompt``, ``chosen``, ``rejected`` strings (TRL's standard format).
* ``conversational``: ``prompt`` a list of messages, ``chosen`` / ``rejected`` lists holding the
  assistant message (TRL's conversational format).
* ``implicit``: ``chosen`` / ``rejected`` whole conversations; the prompt is everything before
  their last (assistant) message, compared message by message.

A structurally wrong row raises :class:`RowError` (the caller names file and line); a row that is
well-formed but unusable (no assistant turn, mismatched prompts, an empty answer, two identical
answers, ...) returns a drop reason, counted in the data report.
"""

from __future__ import annotations

from typing import Any

from dpolab.data.templates import ASSISTANT, ROLES, hh_to_messages
from dpolab.errors import ConfigError, DataError

FORMATS = ("hh", "explicit", "conversational", "implicit")
KNOWN = ("hh (chosen, rejected: dialogues), explicit (prompt, chosen, rejected: strings), conversational "
         "(prompt, chosen, rejected: message lists), implicit (chosen, rejected: whole conversations)")
# The internal pair. ``messages`` is empty for a text pair; ``prompt`` is "" for a messages pair.
EMPTY = {"prompt": "", "messages": [], "chosen": "", "rejected": ""}
# Drop reason of a pair whose two answers are the same text (up to surrounding whitespace): DPO's
# margin is 0 on it whatever the model, so it only dilutes the batch and fakes a 0 reward accuracy.
IDENTICAL = "identical_answers"


class RowError(ValueError):
    """A malformed row; the message names the field."""


def parse_columns(spec: str | None) -> dict[str, str]:
    """``'prompt=question,chosen=good'`` -> ``{'question': 'prompt', 'good': 'chosen'}`` (source -> ours)."""
    if not spec:
        return {}
    mapping = {}
    for item in spec.split(","):
        ours, _, theirs = item.partition("=")
        if ours.strip() not in ("prompt", "chosen", "rejected") or not theirs.strip():
            raise ConfigError(f"columns: expected prompt=COL,chosen=COL,rejected=COL, got {item!r}")
        mapping[theirs.strip()] = ours.strip()
    return mapping


def check_columns(row: dict[str, Any], mapping: dict[str, str], where: str, in_mix: bool) -> None:
    """Fail naming the first ``--columns`` source column that ``row`` (a source's first row) lacks:
    else the row would be read by its own column names, a mapping the user gave silently unused. In
    a mix the mapping is for the sources that have those columns: one already in our names passes."""
    for theirs, ours in mapping.items():
        if theirs not in row and not (in_mix and ours in row):
            raise DataError(f"{where}: columns: {ours}={theirs} names no column of the data "
                            f"(columns found: {', '.join(sorted(row))})")


def rename(row: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    return {mapping.get(k, k): v for k, v in row.items()} if mapping else row


def detect_format(row: dict[str, Any], where: str) -> str:
    """The format of a (renamed) row, from its columns and the type of ``chosen``."""
    columns = set(row)
    if {"chosen", "rejected"} <= columns:
        listy = isinstance(row["chosen"], list)
        if "prompt" in columns:
            return "conversational" if listy or isinstance(row["prompt"], list) else "explicit"
        return "implicit" if listy else "hh"
    raise DataError(f"{where}: unknown layout: columns {sorted(columns)}; known formats: {KNOWN}; "
                    f"map other names with --columns prompt=COL,chosen=COL,rejected=COL")


def _text(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise RowError(f"missing key {key!r}")
    if not isinstance(row[key], str):
        raise RowError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]


def _messages(row: dict[str, Any], key: str) -> list[dict[str, str]]:
    if key not in row:
        raise RowError(f"missing key {key!r}")
    value = row[key]
    if not isinstance(value, list):
        raise RowError(f"field {key!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RowError(f"field {key!r}: message {i} must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise RowError(f"field {key!r}: message {i} has role {message.get('role')!r} (expected one of {ROLES})")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _split_dialogue(dialogue: str) -> tuple[str, str] | None:
    cut = dialogue.rfind(ASSISTANT)
    if cut < 0:
        return None
    cut += len(ASSISTANT)
    return dialogue[:cut], dialogue[cut:]


def _answer(messages: list[dict[str, str]]) -> str | None:
    """The content of a one-message assistant answer, or None."""
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        return None
    return messages[0]["content"]


def adapt(row: dict[str, Any], fmt: str, chat: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(pair, None) or (None, drop reason). ``chat``: the run renders with a chat template, so HH
    dialogues become messages too (otherwise they stay text, split exactly as in the release)."""
    if fmt in ("hh", "explicit"):
        if fmt == "hh":
            chosen, rejected = _split_dialogue(_text(row, "chosen")), _split_dialogue(_text(row, "rejected"))
            if chosen is None or rejected is None:
                return None, "no_assistant_turn"
            (prompt, chosen_text), (other_prompt, rejected_text) = chosen, rejected
        else:
            prompt = other_prompt = _text(row, "prompt")
            chosen_text, rejected_text = _text(row, "chosen"), _text(row, "rejected")
        if prompt != other_prompt:
            return None, "prompt_mismatch"
        if not chosen_text.strip() or not rejected_text.strip():
            return None, "empty_answer"
        if chosen_text.strip() == rejected_text.strip():
            return None, IDENTICAL
        if chat and fmt == "hh":
            return {**EMPTY, "messages": hh_to_messages(prompt), "chosen": chosen_text.strip(),
                    "rejected": rejected_text.strip()}, None
        return {**EMPTY, "prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}, None
    if fmt == "conversational":
        prompt = _messages(row, "prompt")
        chosen_ans, rejected_ans = _answer(_messages(row, "chosen")), _answer(_messages(row, "rejected"))
    elif fmt == "implicit":
        chosen_conv, rejected_conv = _messages(row, "chosen"), _messages(row, "rejected")
        if not chosen_conv or not rejected_conv:
            return None, "empty_answer"
        prompt = chosen_conv[:-1]
        if prompt != rejected_conv[:-1]:  # message by message, never character by character
            return None, "prompt_mismatch"
        chosen_ans, rejected_ans = _answer(chosen_conv[-1:]), _answer(rejected_conv[-1:])
    else:
        raise ConfigError(f"data_format: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if chosen_ans is None or rejected_ans is None:
        return None, "last_not_assistant"
    if not chosen_ans.strip() or not rejected_ans.strip():
        return None, "empty_answer"
    if chosen_ans.strip() == rejected_ans.strip():
        return None, IDENTICAL
    if not any(m["role"] == "user" for m in prompt):
        return None, "no_user_turn"
    return {**EMPTY, "messages": prompt, "chosen": chosen_ans, "rejected": rejected_ans}, None


def to_pair(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """One HH-RLHF row as a text pair ``{prompt, chosen, rejected}`` or its drop reason (what
    ``dpolab train`` makes of a row that ``dpolab serve``'s preference capture wrote)."""
    pair, reason = adapt(row, "hh", chat=False)
    return (None, reason) if pair is None else ({k: pair[k] for k in ("prompt", "chosen", "rejected")}, None)
