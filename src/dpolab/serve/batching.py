"""Continuous batching: answers being generated at the same time share one forward pass per step.

One :class:`Batcher` (and one thread) per served model. Each answer is a *row*:

* :meth:`Batcher.generate` (called from the job's worker thread, which blocks until its row ends)
  puts the row in ``pending``; the loop picks it up at its next step, so a request that arrives
  mid-batch joins at the next step, never waiting for the batch to drain.
* Admission prefills the row's prompt alone (batch 1, no padding: a prompt costs what it costs
  a solo request, and its first token comes out right after, which keeps time to first token
  at one prefill rather than one batch) and samples its first token.
* Then one decode step: the last token of every row, one batched forward against the shared
  KV cache, one next token per row, each with its own sampling settings and random stream
  (:mod:`dpolab.serve.sampling`), streamed at once through the row's ``on_token``.
* The shared cache is left-padded: rows are right-aligned in (B, H, L, D) keys/values with an
  attention mask (B, L) over real positions, and each row has its own position ids, so the
  padding changes neither a row's positions nor what it attends to. A newcomer's prefill cache
  is padded on the left to L (or the batch is, when the newcomer is longer). A row that ends
  (EOS, a stop string, its max_new_tokens, or ``should_stop``: cancelled or past its time limit,
  checked before every step) leaves the batch dimension at once, and columns that have become
  padding in every row are cut, so one long prompt does not tax the batch after it leaves.

Why our own loop rather than ``transformers``' continuous batching (``generate_batch``): on this
CPU it was no faster than one plain left-padded ``generate`` (BENCHMARKS.md: 17.5 vs 69
tokens/s as first measured), it reserves most free RAM for its paged cache unless sized by hand, and it
takes one generation config for all requests: no per-request sampling settings, stop strings or
cancellation. This loop calls the model's ordinary forward with a ``DynamicCache``, so it serves
every precision :mod:`dpolab.generate` loads (fp32, bf16, int8).

Greedy answers in fp32 are the ids the request gets alone (tests/serve/test_batching.py; bf16
agreed too in a spot check): padding is masked out exactly. int8 is not batch invariant:
``quantize_dynamic`` picks one activation scale per forward, over the whole batch, so an answer
may drift from its solo run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dpolab.serve.sampling import generator_for, next_tokens
from dpolab.serve.validation import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One answer being generated."""

    prompt_ids: list[int]
    params: SamplingParams
    on_token: Callable[[int], bool]  # streams one token; True when the answer ended (EOS, stop string)
    should_stop: Callable[[], bool]  # cancelled or timed out: checked before every step
    generator: torch.Generator
    seen: torch.Tensor  # (n,) prompt + answer ids, for the repetition penalty
    length: int = 0  # tokens in the cache = the position of ``last``
    produced: int = 0
    last: int = -1  # the newest token, fed at the next step
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class Batcher:
    """The decode loop of one model; see the module docstring."""

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self._pending: list[Row] = []
        self._rows: list[Row] = []
        self._cache: Any = None  # DynamicCache of the rows: keys/values (B, H, L, D)
        self._mask: torch.Tensor | None = None  # (B, L): 1 where a row has a real token
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"dpolab-batch-{name}", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Rows submitted but not yet admitted (picked up at the next step)."""
        with self._cond:
            return len(self._pending)

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_token: Callable[[int], bool],
                 should_stop: Callable[[], bool]) -> None:
        """Generate one answer in the shared batch; returns when it has ended."""
        row = Row(prompt_ids=list(prompt_ids), params=params, on_token=on_token, should_stop=should_stop,
                  generator=generator_for(params), seen=torch.tensor(prompt_ids, dtype=torch.long))
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._pending.append(row)
            self._cond.notify()
        row.done.wait()
        if row.error is not None:
            raise row.error

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the loop (its own thread; the only one touching rows, cache and mask) -------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._rows or self._closed):
                    self._cond.wait()
                new, self._pending = self._pending, []
                closed = self._closed
            if closed:  # the engine cancelled every job first: end what is left as it stands
                self._end(self._rows + new)
                return
            try:
                with torch.inference_mode():
                    self._step(new)
            except Exception as exc:  # a failed forward fails the rows it was serving, not the server
                logger.exception("batched decode step failed")
                failed = [r for r in self._rows + new if not r.done.is_set()]
                for row in failed:
                    row.error = exc
                self._end(failed)

    def _step(self, new: list[Row]) -> None:
        self._retire([r for r in self._rows if r.should_stop()])
        for row in new:
            if row.should_stop():  # cancelled while waiting: no work at all
                row.done.set()
            else:
                self._admit(row)
        if self._rows:
            self._decode()

    def _admit(self, row: Row) -> None:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([row.prompt_ids], dtype=torch.long)  # (1, T)
        logits = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits  # (1, 1, V)
        row.length = ids.shape[1]
        if self._push(row, next_tokens(logits[:, -1].float(), [row.params], [row.seen], [row.generator])[0]):
            row.done.set()
            return
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, torch.ones_like(ids), [row]
            return
        assert self._mask is not None
        width = max(self._mask.shape[1], row.length)
        self._mask = torch.cat([_pad_left(self._mask, width, -1), _pad_left(torch.ones_like(ids), width, -1)])
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self._rows.append(row)

    def _decode(self) -> None:
        rows = self._rows
        assert self._mask is not None
        ids = torch.tensor([[r.last] for r in rows], dtype=torch.long)  # (B, 1)
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long)  # (B, 1)
        self._mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)  # (B, L + 1)
        logits = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions, cache=self._cache,
                            use_cache=True).logits[:, -1].float()  # (B, V)
        tokens = next_tokens(logits, [r.params for r in rows], [r.seen for r in rows], [r.generator for r in rows])
        ended = []
        for row, token in zip(rows, tokens, strict=True):
            row.length += 1
            if self._push(row, token):
                ended.append(row)
        self._retire(ended)

    @staticmethod
    def _push(row: Row, token: int) -> bool:
        """Stream the row's new token; True when the row has ended."""
        row.produced += 1
        row.last = token
        row.seen = torch.cat([row.seen, torch.tensor([token])])
        ended = row.on_token(token)
        return ended or row.produced >= row.params.max_new_tokens

    def _retire(self, ended: list[Row]) -> None:
        if not ended:
            return
        keep = [i for i, r in enumerate(self._rows) if r not in ended]
        for row in ended:
            row.done.set()
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask[index]  # (B', L)
        start = int(mask.any(dim=0).int().argmax())  # first column where some row has a real token
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def _end(self, rows: list[Row]) -> None:
        for row in rows:
            row.done.set()
        self._rows, self._cache, self._mask = [], None, None


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros on the left of ``dim`` (-1 or -2) up to ``width``."""
    missing = width - x.shape[dim]
    return F.pad(x, (missing, 0) if dim == -1 else (0, 0, missing, 0)) if missing else x
