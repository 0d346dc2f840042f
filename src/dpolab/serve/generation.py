"""The generation engine: models loaded once, a bounded job queue, a pool of worker threads.

A request becomes a :class:`Job`. Admission is bounded (``workers`` running + ``max_queue``
waiting); past that :meth:`Engine.submit` raises :class:`QueueFull` and the API answers 429, so
a burst cannot pile up unbounded work or memory. A worker takes a job and, answer by answer,
hands it to its model's :class:`~dpolab.serve.batching.Batcher`, where every answer being
generated at the time shares one batched forward per decode step (the module explains how
requests join and leave). Per answer:

* an :class:`AnswerSink` decodes token by token, cuts at stop strings, and pushes text deltas
  onto the job's event queue (which the HTTP response reads, SSE or not);
* a :class:`RequestStop` tied to the job: the Stop button, a client that disconnects or the
  per-request time limit take the answer out of the batch before the next step, on the server.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpolab.serve.batching import Batcher
from dpolab.serve.chat import scored_answer_ids
from dpolab.serve.metrics import Metrics
from dpolab.serve.models import LoadedModel, ServedModels, implicit_rewards
from dpolab.serve.validation import SamplingParams

logger = logging.getLogger(__name__)

class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("generation queue is full")
        self.retry_after = retry_after


class NotReady(Exception):
    pass


@dataclass
class Answer:
    role: str  # "policy" | "reference"
    model: str
    text: str
    finish_reason: str  # "stop" (EOS or stop string) | "length" | "cancelled" | "time_limit"
    completion_tokens: int
    seconds: float
    reward: float | None = None

    def public(self) -> dict[str, Any]:
        return {"role": self.role, "model": self.model, "text": self.text, "finish_reason": self.finish_reason,
                "completion_tokens": self.completion_tokens, "seconds": round(self.seconds, 4),
                "reward": self.reward}


@dataclass
class Job:
    """One request's work and the event queue its HTTP response reads.

    Events are ``(kind, data)``: ``token`` {role, text}, ``answer`` (one finished answer),
    then exactly one terminal ``result`` or ``error``.
    """

    prompt: str
    params: SamplingParams
    roles: tuple[str, ...] = ("policy",)
    stops: tuple[str, ...] = ()
    timeout_s: float = 60.0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    events: queue.Queue = field(default_factory=queue.Queue)
    created: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float:
        return self.created + self.timeout_s

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.events.put((kind, data))

    def next_event(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None


class AnswerSink:
    """Token ids in, text deltas out, never past a stop string.

    Text is re-decoded from all answer ids at each step (answers are short) so multi-token
    characters come out whole; the tail that could still become a stop string, or an incomplete
    UTF-8 character (decoded as U+FFFD), is held back until the next token decides it.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], on_text: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False  # EOS or a stop string: a natural end ("stop")
        self._final = False

    def put_ids(self, ids: list[int]) -> None:
        if self.stopped:
            return
        eos = self.tokenizer.eos_token_id
        for token in ids:
            self.ids.append(token)
            if token == eos:
                self.stopped = True
                break
        self._update(final=self.stopped)

    def end(self) -> None:
        self._update(final=True)

    def _update(self, final: bool) -> None:
        if self._final:
            return
        eos = self.tokenizer.eos_token_id
        ids = [t for t in self.ids if t != eos]
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        safe = len(text)
        if not final:
            safe = len(text.rstrip("\ufffd"))
            for stop in self.stops:  # longest tail of the text that begins some stop string
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        self.text = text
        if safe > self.sent:
            self.on_text(text[self.sent:safe])
            self.sent = safe
        self._final = final


class RequestStop:
    """Whether one job's answer must end now: cancelled, past its deadline, or its sink has stopped."""

    def __init__(self, job: Job, sink: AnswerSink) -> None:
        self.job, self.sink = job, sink
        self.reason: str | None = None

    def check(self) -> bool:
        if self.reason is None:
            if self.job.cancelled:
                self.reason = "cancelled"
            elif time.monotonic() > self.job.deadline:
                self.reason = "time_limit"
        return self.sink.stopped or self.reason is not None


class Engine:
    """Owns the models (loaded once, in the background so /healthz can answer 503 meanwhile), the
    worker threads (one per running job) and one decode loop per model (shared by the running jobs)."""

    def __init__(self, loader: Callable[[], ServedModels], workers: int = 1, max_queue: int = 8,
                 metrics: Metrics | None = None) -> None:
        if workers < 1 or max_queue < 0:
            raise ValueError("workers must be >= 1 and max_queue >= 0")
        self.loader = loader
        self.workers = workers
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.models: ServedModels | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.generate: Callable[..., None] = self.batched_generate  # the one seam tests replace (XSS test)
        self._batchers: dict[int, Batcher] = {}  # id(LoadedModel) -> its decode loop
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._registry: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._admitted = 0  # waiting + running
        self._active = 0
        self._mean_job_s = 1.0
        self._threads: list[threading.Thread] = []
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, background: bool = True) -> Engine:
        if self._started:
            return self
        self._started = True
        if background:
            threading.Thread(target=self._load, name="dpolab-load", daemon=True).start()
        else:
            self._load()
        return self

    def _load(self) -> None:
        try:
            self.models = self.loader()
        except Exception as exc:  # reported by /healthz; the process stays up to say why
            logger.exception("model loading failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"dpolab-gen-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.ready.set()

    def close(self) -> None:
        with self._lock:
            jobs = list(self._registry.values())
        for job in jobs:
            job.cancel()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()

    # -- admission -------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._admitted - self._active

    @property
    def active(self) -> int:
        with self._lock:
            return self._active

    def submit(self, job: Job) -> Job:
        if not self.ready.is_set():
            raise NotReady(self.load_error or "models are loading")
        with self._lock:
            if self._admitted >= self.workers + self.max_queue:
                waiting = self._admitted - self._active + 1
                retry = max(1, math.ceil(self._mean_job_s * waiting / self.workers))
                raise QueueFull(retry)
            self._admitted += 1
            self._registry[job.id] = job
        self._jobs.put(job)
        return job

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            job = self._registry.get(job_id)
        if job is None:
            return False
        job.cancel()
        return True

    # -- work ------------------------------------------------------------------------------
    def batcher(self, loaded: LoadedModel) -> Batcher:
        """``loaded``'s decode loop, started on first use."""
        with self._lock:
            batcher = self._batchers.get(id(loaded))
            if batcher is None:
                batcher = self._batchers[id(loaded)] = Batcher(loaded.model, loaded.id)
            return batcher

    def batched_generate(self, loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams,
                         sink: AnswerSink, stop: RequestStop) -> None:
        """Generate one answer in ``loaded``'s shared batch; tokens flow out through ``sink``."""

        def on_token(token: int) -> bool:
            sink.put_ids([token])
            return sink.stopped

        self.batcher(loaded).generate(prompt_ids, params, on_token, stop.check)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._active += 1
            started = time.monotonic()
            try:
                self._run(job)
            except Exception as exc:
                logger.exception("generation failed")
                job.emit("error", {"status": 500, "message": f"generation failed: {type(exc).__name__}: {exc}"})
            finally:
                with self._lock:
                    self._active -= 1
                    self._admitted -= 1
                    self._registry.pop(job.id, None)
                    self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.monotonic() - started)
                job.done.set()

    def _run(self, job: Job) -> None:
        models = self.models
        assert models is not None
        answers: list[Answer] = []
        for role in job.roles:
            loaded = models.policy if role == "policy" else models.reference
            assert loaded is not None
            answers.append(self._answer(job, role, loaded))
            job.emit("answer", answers[-1].public())
        prompt_ids = models.policy.tokenizer(job.prompt).input_ids
        # Scored as the trainer scores a preference pair (HH text + EOS, or the chat template's
        # assistant turn), tokenized by the policy's tokenizer for both models.
        answer_ids = [scored_answer_ids(models.policy.tokenizer, a.text) for a in answers]
        rewards = implicit_rewards(models, prompt_ids, answer_ids)
        for answer, reward in zip(answers, rewards or [None] * len(answers), strict=True):
            answer.reward = reward
        job.emit("result", {"id": job.id, "answers": [a.public() for a in answers], "beta": models.beta})

    def _answer(self, job: Job, role: str, loaded: LoadedModel) -> Answer:
        started = time.monotonic()
        first_text = role == job.roles[0]  # time to first token: the request's first answer text

        def on_text(text: str) -> None:
            nonlocal first_text
            if first_text:
                first_text = False
                self.metrics.observe_first_token(time.monotonic() - job.created)
            job.emit("token", {"role": role, "text": text})

        sink = AnswerSink(loaded.tokenizer, job.stops, on_text)
        stop = RequestStop(job, sink)
        if not stop.check():  # cancelled or timed out while waiting in the queue: do no work
            self.generate(loaded, loaded.tokenizer(job.prompt).input_ids, job.params, sink, stop)
        sink.end()
        stop.check()
        if sink.stopped:
            reason = "stop"
        elif stop.reason is not None:
            reason = stop.reason
        else:
            reason = "length"
        seconds = time.monotonic() - started
        self.metrics.count_generation(reason, len(sink.ids), seconds)
        return Answer(role=role, model=loaded.id, text=sink.text, finish_reason=reason,
                      completion_tokens=len(sink.ids), seconds=seconds)
