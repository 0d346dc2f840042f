"""Pairs -> token ids under a length budget, one ``datasets`` batch at a time.

:func:`tokenize_batch` is the function ``Dataset.map(batched=True, num_proc=...)`` runs, so
memory holds one batch of ids, never the whole data set (results go to Arrow files on disk).

* Text pairs (HH, explicit, or messages rendered in the HH format) are tokenized prompt and answer
  apart and EOS is appended to each answer, exactly as before the ``datasets`` pipeline.
* Chat-template pairs are tokenized as TRL 1.16 does: the prompt with the generation prompt, then
  prompt + answer as one conversation; the answer is the ids after their common prefix, so it ends
  with what the template closes a turn with (its end-of-turn token), and nothing is appended.

Truncation is the same for every format: the prompt loses its OLDEST tokens first (down to
``max_prompt_length``), then answers are cut at the end.

Each pair also records its answers' lengths for the length-controlled metrics
(:mod:`dpolab.scoring.length`): ``*_tokens``, the answer's tokens as trained without an appended
EOS (a chat template's end-of-turn tokens are the answer's own, so they count), and ``*_chars``,
the characters of the answer's text as the data gives it (surrounding whitespace stripped).
"""

from __future__ import annotations

from typing import Any

from dpolab.data.templates import Formatter

LENGTH_COLUMNS = ("chosen_tokens", "rejected_tokens", "chosen_chars", "rejected_chars")
OUTPUT_COLUMNS = ("prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids", "length",
                  *LENGTH_COLUMNS)
FLAG_COLUMNS = ("prompt_cut", "answer_cut")  # kept in the Arrow files, summed into the data report


def truncate_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Fit prompt + longer answer into ``max_length``.

    The prompt loses its OLDEST tokens first (the latest turns are the context that matters),
    but not below ``max_prompt_length``; then answers are cut at the end. Returns the three id
    lists and whether the prompt / the answers were cut.
    """
    longest = max(len(chosen_ids), len(rejected_ids))
    overflow = len(prompt_ids) + longest - max_length
    prompt_cut = answer_cut = False
    if overflow > 0:
        removable = max(0, len(prompt_ids) - max_prompt_length)
        drop = min(overflow, removable)
        if drop:
            prompt_ids = prompt_ids[drop:]
            prompt_cut = True
        room = max_length - len(prompt_ids)
        if longest > room:
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            answer_cut = True
    return prompt_ids, chosen_ids, rejected_ids, prompt_cut, answer_cut


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast (Rust) tokenizer's own
    if backend is not None and backend.truncation is None and backend.padding is None:
        # The Rust encoder directly, without the offsets and attention masks tokenizer(...) builds
        # and converts: the same ids (tests/data/test_golden.py), 8-20% less tokenizing time.
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def render_and_encode(batch: dict[str, list], tokenizer: Any, formatter: Formatter) -> dict[str, Any]:
    """Texts and untruncated ids of a batch of internal pairs (columns prompt, messages, chosen, rejected),
    and which rows had EOS appended to their answers (``eos_rows``: the text rows)."""
    n = len(batch["chosen"])
    texts: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    chat_rows, text_rows = [], []
    fulls: dict[str, list[str]] = {"chosen": [], "rejected": []}
    for i in range(n):
        messages = batch["messages"][i]
        if messages and formatter.is_chat:
            prompt = formatter.prompt(messages)
            for side in ("chosen", "rejected"):
                fulls[side].append(formatter.full(messages, batch[side][i]))
            chat_rows.append(i)
            texts["prompt"].append(prompt)
            texts["chosen"].append("")
            texts["rejected"].append("")
            continue
        if messages:  # a conversation in the HH text format
            texts["prompt"].append(formatter.prompt(messages))
            texts["chosen"].append(formatter.answer(batch["chosen"][i]))
            texts["rejected"].append(formatter.answer(batch["rejected"][i]))
        else:
            for side in ("prompt", "chosen", "rejected"):
                texts[side].append(batch[side][i])
        text_rows.append(i)
    ids: dict[str, list[Any]] = {k: [None] * n for k in ("prompt", "chosen", "rejected")}
    eos = tokenizer.eos_token_id
    for side in ("prompt", "chosen", "rejected"):
        encoded = _encode(tokenizer, [texts[side][i] for i in text_rows])
        for i, row_ids in zip(text_rows, encoded, strict=True):
            ids[side][i] = row_ids + [eos] if side != "prompt" else row_ids
    if chat_rows:
        prompts = _encode(tokenizer, [texts["prompt"][i] for i in chat_rows])
        full = {side: _encode(tokenizer, fulls[side]) for side in ("chosen", "rejected")}
        for j, i in enumerate(chat_rows):
            cut = min(_common_prefix(prompts[j], full["chosen"][j]), _common_prefix(prompts[j], full["rejected"][j]))
            ids["prompt"][i] = prompts[j][:cut]
            for side in ("chosen", "rejected"):
                ids[side][i] = full[side][j][cut:]
                whole = fulls[side][j]
                prompt_text = texts["prompt"][i]
                texts[side][i] = whole[len(prompt_text):] if whole.startswith(prompt_text) else (
                    tokenizer.decode(ids[side][i]))
    return {"texts": texts, "ids": ids, "eos_rows": set(text_rows)}


def answer_ids(tokenizer: Any, formatter: Formatter, answer: str) -> list[int]:
    """One answer's ids exactly as training scores it after any prompt: HH text plus EOS, or what
    the chat template adds to a conversation for the assistant's turn (end-of-turn token included)."""
    if not formatter.is_chat:
        return _encode(tokenizer, [formatter.answer(answer)])[0] + [tokenizer.eos_token_id]
    probe = [{"role": "user", "content": "?"}]
    prompt, full = _encode(tokenizer, [formatter.prompt(probe), formatter.full(probe, answer)])
    return full[_common_prefix(prompt, full):]


def tokenize_batch(batch: dict[str, list], tokenizer: Any, formatter: Formatter, max_length: int,
                   max_prompt_length: int) -> dict[str, list]:
    """The ``datasets.map`` function: output columns plus per-row truncation flags. A pair with no
    answer token left is left out (the caller counts the rows that went missing)."""
    rendered = render_and_encode(batch, tokenizer, formatter)
    texts, ids = rendered["texts"], rendered["ids"]
    out: dict[str, list] = {k: [] for k in (*OUTPUT_COLUMNS, *FLAG_COLUMNS)}
    for i in range(len(batch["chosen"])):
        prompt_ids, chosen_ids, rejected_ids, prompt_cut, answer_cut = truncate_pair(
            ids["prompt"][i], ids["chosen"][i], ids["rejected"][i], max_length, max_prompt_length)
        if not chosen_ids or not rejected_ids:
            continue
        # Answers are cut at the end: an appended EOS survives exactly when nothing was cut.
        tokens = {side: len(kept) - (i in rendered["eos_rows"] and len(kept) == len(ids[side][i]))
                  for side, kept in (("chosen", chosen_ids), ("rejected", rejected_ids))}
        for key, value in (("prompt", texts["prompt"][i]), ("chosen", texts["chosen"][i]),
                           ("rejected", texts["rejected"][i]), ("prompt_ids", prompt_ids),
                           ("chosen_ids", chosen_ids), ("rejected_ids", rejected_ids),
                           ("length", len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))),
                           ("chosen_tokens", tokens["chosen"]), ("rejected_tokens", tokens["rejected"]),
                           ("chosen_chars", len(batch["chosen"][i].strip())),
                           ("rejected_chars", len(batch["rejected"][i].strip())),
                           ("prompt_cut", prompt_cut), ("answer_cut", answer_cut)):
            out[key].append(value)
    return out
