"""Chat turns <-> the HH-RLHF training format, and fitting a long chat into the context window.

The model was trained on dialogues ``\\n\\nHuman: ...\\n\\nAssistant: ...``, so the page's chat is
sent exactly that way, ending with ``\\n\\nAssistant:`` for the model to continue.
"""

from __future__ import annotations

from collections.abc import Callable

from dpolab.hh import ASSISTANT, HUMAN
from dpolab.serve.validation import ApiError

# Stop at the model's next turn marker: past it, the model is writing the human's lines. The
# assistant marker stops too, because an answer containing it would make the dialogue ambiguous
# for the trainer, which splits prompt and answer at the *last* "\n\nAssistant:".
TURN_STOPS = (HUMAN, ASSISTANT)


def dialogue(turns: list[dict[str, str]]) -> str:
    """Turns -> training-format prompt ending in ``\\n\\nAssistant:``. A system message (OpenAI
    clients send one) has no HH equivalent; it goes first as plain text."""
    parts = []
    for turn in turns:
        content = turn["content"].strip()
        if turn["role"] == "system":
            parts.append(content)
        elif turn["role"] == "user":
            parts.append(f"{HUMAN} {content}")
        else:
            parts.append(f"{ASSISTANT} {content}")
    return "".join(parts) + ASSISTANT


def format_answer(answer: str) -> str:
    """An answer as it follows ``\\n\\nAssistant:`` in HH-RLHF rows: one leading space."""
    return " " + answer.strip()


def check_turns(turns: list[dict[str, str]], param: str) -> None:
    chat = [t for t in turns if t["role"] != "system"]
    if not chat or chat[-1]["role"] != "user":
        raise ApiError(f"{param}: the last message must be a user message", param=param, code="invalid_value")
    if not chat[-1]["content"].strip():
        raise ApiError(f"{param}: the last user message must not be empty", param=param, code="empty_field")


def fit_turns(turns: list[dict[str, str]], count_tokens: Callable[[str], int], budget: int,
              param: str) -> tuple[str, int, int]:
    """Drop the oldest turns until the prompt fits ``budget`` tokens.

    Returns (prompt, prompt_tokens, dropped_turns). A last user turn that does not fit on its own
    is the client's error (400): cutting it would answer a question nobody asked.
    """
    turns = list(turns)
    dropped = 0
    while True:
        prompt = dialogue(turns)
        n_tokens = count_tokens(prompt)
        if n_tokens <= budget:
            return prompt, n_tokens, dropped
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
