"""Chat turns -> the prompt the model was trained on, and fitting a long chat into the context window.

Rendering is the training pipeline's own :class:`~dpolab.data.templates.Formatter`: the HH text
format (``\\n\\nHuman: ...\\n\\nAssistant:``) for template-less models such as GPT-2, the
tokenizer's chat template (generation prompt on) for instruct models. The served model's
tokenizer is the one saved with it, which carries the template it was trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from dpolab.data.templates import Formatter, resolve_formatter
from dpolab.data.tokenize import answer_ids
from dpolab.hh import ASSISTANT, HUMAN
from dpolab.serve.validation import ApiError

HH = Formatter("hh")
# Stop at the model's next turn marker: past it, the model is writing the human's lines. The
# assistant marker stops too, because an answer containing it would make the dialogue ambiguous
# for the trainer, which splits prompt and answer at the *last* "\n\nAssistant:".
TURN_STOPS = (HUMAN, ASSISTANT)


@lru_cache(maxsize=8)
def formatter_for(tokenizer: Any) -> Formatter:
    """How the model behind ``tokenizer`` was trained to see a conversation (its chat template, else HH)."""
    return resolve_formatter(tokenizer)


def dialogue(turns: list[dict[str, str]], formatter: Formatter = HH) -> str:
    """Turns -> the training-format prompt, ready for the assistant's turn (HH: ending in
    ``\\n\\nAssistant:``; a system message, which HH lacks, goes first as plain text)."""
    return formatter.prompt(turns)


def format_answer(answer: str) -> str:
    """An answer as it follows ``\\n\\nAssistant:`` in HH-RLHF rows: one leading space."""
    return HH.answer(answer)


def scored_answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """A generated answer's ids as the trainer scores them (for the compare view's implicit reward)."""
    return answer_ids(tokenizer, formatter_for(tokenizer), answer)


def check_turns(turns: list[dict[str, str]], param: str) -> None:
    chat = [t for t in turns if t["role"] != "system"]
    if not chat or chat[-1]["role"] != "user":
        raise ApiError(f"{param}: the last message must be a user message", param=param, code="invalid_value")
    if not chat[-1]["content"].strip():
        raise ApiError(f"{param}: the last user message must not be empty", param=param, code="empty_field")


def fit_turns(turns: list[dict[str, str]], count_tokens: Callable[[str], int], budget: int,
              param: str, formatter: Formatter = HH, drop_oldest: bool = True) -> tuple[str, int, int]:
    """Drop the oldest turns until the prompt fits ``budget`` tokens (only with ``drop_oldest``).

    Returns (prompt, prompt_tokens, dropped_turns). A conversation that does not fit is the
    client's error (400 ``context_length_exceeded``) without ``drop_oldest``, and so is a last user
    turn that does not fit on its own: cutting it would answer a question nobody asked.
    """
    turns = list(turns)
    dropped = 0
    while True:
        prompt = dialogue(turns, formatter)
        n_tokens = count_tokens(prompt)
        if n_tokens <= budget:
            return prompt, n_tokens, dropped
        if not drop_oldest:
            raise ApiError(
                f"{param}: the conversation is {n_tokens} tokens; at most {budget} fit (context minus max "
                f"tokens). Shorten it, ask for fewer tokens, or send \"truncate_turns\": true to drop the oldest "
                f"turns", param=param, code="context_length_exceeded")
        if len(turns) == 1:
            raise ApiError(
                f"{param}: the last user message alone is {n_tokens} tokens; at most {budget} fit "
                f"(context minus max new tokens)", param=param, code="context_length_exceeded")
        # Oldest first, a whole exchange at a time (the dialogue must still open with a Human turn);
        # history goes before system text, so a system message is dropped last of all.
        index = next((i for i, t in enumerate(turns[:-1]) if t["role"] != "system"), 0)
        turns.pop(index)
        dropped += 1
        while index < len(turns) - 1 and turns[index]["role"] == "assistant":
            turns.pop(index)
            dropped += 1
