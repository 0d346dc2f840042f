"""Batched serving: answers generated at the same time share decode steps, yet each comes out
exactly as it would alone (greedy ids, seeded samples), with its own stop strings, and one can be
cancelled without disturbing the others.

The real tiny model computes everything; :class:`GatedModel` only controls *when* a forward may run
(a gate the test opens) so that several requests are known to share steps, on however busy a
machine: no sleeps, no timing assumptions.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest
import torch

from dpolab.serve.batching import Batcher
from dpolab.serve.generation import Engine, Job
from dpolab.serve.models import LoadedModel, ServedModels
from dpolab.serve.validation import SamplingParams
from tests.serve.test_live_server import wait_for

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


class GatedModel:
    """The real model behind a gate: a forward waits while the gate is closed; batch sizes are recorded."""

    def __init__(self, model: Any) -> None:
        self.model, self.config = model, model.config
        self.open = threading.Event()
        self.blocked = threading.Event()  # a forward is waiting at the closed gate
        self.batch_sizes: list[int] = []

    def release(self) -> None:
        self.blocked.clear()
        self.open.set()

    def __call__(self, **kwargs: Any) -> Any:
        if not self.open.is_set():
            self.blocked.set()
            self.open.wait()
        self.batch_sizes.append(kwargs["input_ids"].shape[0])
        return self.model(**kwargs)


class Request:
    """One answer generated on its own thread; ``ids`` are its tokens. ``cancel_after``: the request
    cancels itself once it has that many tokens (from the decode loop, so exactly then)."""

    def __init__(self, batcher: Batcher, prompt: list[int], params: SamplingParams,
                 cancel_after: int | None = None, on_token: Any = None) -> None:
        self.ids: list[int] = []
        self.cancelled = threading.Event()
        self.cancel_after = cancel_after
        self.hook = on_token
        self.thread = threading.Thread(target=batcher.generate,
                                       args=(prompt, params, self._on_token, self.cancelled.is_set))
        self.thread.start()

    def _on_token(self, token: int) -> bool:
        self.ids.append(token)
        if self.cancel_after is not None and len(self.ids) >= self.cancel_after:
            self.cancelled.set()
        if self.hook is not None:
            self.hook(len(self.ids))
        return False

    def result(self) -> list[int]:
        self.thread.join(timeout=120)
        assert not self.thread.is_alive()
        return self.ids


@pytest.fixture(scope="module")
def prompts(served: ServedModels) -> list[list[int]]:
    """Prompts of different lengths, so joining rows pad the batch and the newcomer in turn."""
    tokenizer = served.policy.tokenizer
    texts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is the tallest mountain in the world, and how tall?"
             "\n\nAssistant:", "\n\nHuman: Tell me a story\n\nAssistant:", "Once upon a time",
             "\n\nHuman: A longer question that arrives while the others are already decoding, so it must "
             "pad the whole batch on the left\n\nAssistant:"]
    return [tokenizer(text).input_ids for text in texts]


def solo(model: Any, prompt: list[int], params: SamplingParams) -> list[int]:
    batcher = Batcher(model, "solo")
    try:
        return Request(batcher, prompt, params).result()
    finally:
        batcher.close()


def start_gated(batcher: Batcher, gate: GatedModel, requests: list[tuple[list[int], SamplingParams]],
                **first: Any) -> list[Request]:
    """Submit the first request and let it reach the closed gate, then the others: they are all
    waiting when the test opens the gate, so from the second step on they share every step."""
    started = [Request(batcher, *requests[0], **first)]
    assert gate.blocked.wait(timeout=60)
    started += [Request(batcher, prompt, params) for prompt, params in requests[1:]]
    wait_for(lambda: batcher.waiting == len(requests) - 1)
    return started


def test_concurrent_answers_equal_their_solo_answers(served, prompts):
    """Greedy ids and seeded samples, each request with its own settings, a fifth request joining
    mid-batch: every answer is token for token what the same request gets alone; and alone it is
    what ``model.generate`` gives (positions and cache are right)."""
    model = served.policy.model
    settings = [GREEDY, replace(GREEDY, max_new_tokens=7, repetition_penalty=1.0),
                SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_new_tokens=10, seed=7),
                replace(GREEDY, max_new_tokens=16, repetition_penalty=1.3), replace(GREEDY, max_new_tokens=9)]
    alone = [solo(model, prompt, params) for prompt, params in zip(prompts, settings, strict=True)]
    for prompt, params, ids in zip(prompts, settings, alone, strict=True):
        if params.temperature == 0:
            x = torch.tensor([prompt])
            expected = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=params.max_new_tokens,
                                      do_sample=False, repetition_penalty=params.repetition_penalty,
                                      pad_token_id=0, eos_token_id=None)[0, x.shape[1]:].tolist()
            assert ids == expected

    gate = GatedModel(model)
    batcher = Batcher(gate, "gated")
    joined = threading.Event()

    def close_gate_midway(n_tokens: int) -> None:  # request 0, from the decode loop: hold step 5
        if n_tokens == 4 and not joined.is_set():
            gate.open.clear()

    try:
        requests = start_gated(batcher, gate, list(zip(prompts[:4], settings[:4], strict=True)),
                               on_token=close_gate_midway)
        gate.release()
        assert gate.blocked.wait(timeout=60)  # step 5 is held: the fifth request arrives mid-batch
        joined.set()
        requests.append(Request(batcher, prompts[4], settings[4]))
        wait_for(lambda: batcher.waiting == 1)
        gate.release()
        assert [r.result() for r in requests] == alone
    finally:
        batcher.close()
    assert 4 in gate.batch_sizes and 5 in gate.batch_sizes  # steps were shared, the late one joined


def test_cancelling_one_does_not_disturb_the_others(served, prompts):
    model = served.policy.model
    params = replace(GREEDY, max_new_tokens=14)
    alone = [solo(model, prompt, params) for prompt in prompts[:3]]
    gate = GatedModel(model)
    batcher = Batcher(gate, "gated")
    try:
        # The first request cancels itself after 3 tokens; the decode loop drops it before the next step.
        requests = start_gated(batcher, gate, [(p, params) for p in prompts[:3]], cancel_after=3)
        gate.release()
        results = [r.result() for r in requests]
    finally:
        batcher.close()
    assert results[0] == alone[0][:3]
    assert results[1:] == alone[1:]
    assert 3 in gate.batch_sizes


def answers(engine: Engine, jobs: list[Job]) -> list[dict[str, Any]]:
    out = []
    for job in jobs:
        assert job.done.wait(timeout=120)
        events = list(iter(lambda j=job: j.next_event(0), None))
        kind, data = events[-1]
        assert kind == "result", data
        out.append(data["answers"][0])
    return out


def test_each_request_honours_its_own_stop_strings(served, prompts):
    """Through the engine (AnswerSink + RequestStop + Batcher): requests sharing steps each stop at
    their own stop string, and a request without one runs to its length."""
    gate = GatedModel(served.policy.model)
    gated = ServedModels(policy=LoadedModel("gated", "tiny", gate, served.policy.tokenizer), reference=None,
                         beta=served.beta)
    engine = Engine(lambda: gated, workers=4, max_queue=4).start(background=False)
    # Seeded samples: the random tiny model's greedy answers repeat one token, too dull for stop strings.
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=20, seed=i) for i in range(4)]
    texts = [served.policy.tokenizer.decode(p) for p in prompts[:4]]
    try:
        gate.release()
        alone = [answers(engine, [engine.submit(Job(prompt=t, params=p))])[0]
                 for t, p in zip(texts, params, strict=True)]
        full = [a["text"] for a in alone]
        # Each request's own stop: a piece from late in its solo answer (the last one has none).
        stops = [(text[len(text) * 2 // 3:][:4],) for text in full[:3]] + [()]
        expected = [text[: text.find(stop[0])] if stop else text for text, stop in zip(full, stops, strict=True)]

        gate.open.clear()
        first = engine.submit(Job(prompt=texts[0], params=params[0], stops=stops[0]))
        assert gate.blocked.wait(timeout=60)
        jobs = [first] + [engine.submit(Job(prompt=t, params=p, stops=s))
                          for t, p, s in zip(texts[1:], params[1:], stops[1:], strict=True)]
        wait_for(lambda: engine.batcher(gated.policy).waiting == 3)
        gate.release()
        got = answers(engine, jobs)
    finally:
        engine.close()
    assert 4 in gate.batch_sizes
    assert [a["text"] for a in got] == expected
    assert [a["finish_reason"] for a in got] == ["stop", "stop", "stop", "length"]
    assert 4 in gate.batch_sizes


def test_top_k_and_top_p_are_per_row():
    from dpolab.serve.sampling import filter_top_k_top_p

    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3)
    kept = filter_top_k_top_p(probs.log(), top_k=torch.tensor([2, 0, 0]), top_p=torch.tensor([1.0, 0.6, 1.0]))
    assert torch.isfinite(kept).tolist() == [[True, True, False, False, False],  # top_k 2
                                             [True, True, False, False, False],  # 0.5 + 0.2 reach top_p 0.6
                                             [True] * 5]  # neither: untouched


def test_a_failed_forward_fails_its_rows_and_the_loop_goes_on(served, prompts):
    """A forward that raises (out of memory, a bad model) answers its rows with the error; the decode
    loop survives and serves the next request as if nothing happened."""
    model = served.policy.model
    calls = []

    def flaky(**kwargs: Any) -> Any:
        calls.append(kwargs["input_ids"].shape)
        if len(calls) == 1:
            raise RuntimeError("simulated forward failure")
        return model(**kwargs)

    flaky.config = model.config  # type: ignore[attr-defined]
    batcher = Batcher(flaky, "flaky")
    try:
        with pytest.raises(RuntimeError, match="simulated forward failure"):
            batcher.generate(prompts[0], GREEDY, lambda t: False, lambda: False)
        assert Request(batcher, prompts[0], GREEDY).result() == solo(model, prompts[0], GREEDY)
    finally:
        batcher.close()
