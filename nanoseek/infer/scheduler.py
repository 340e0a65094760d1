"""Continuous batching: one thread decodes every running request together; new ones join between steps.

    scheduler = Scheduler(engine).start()
    seq = scheduler.submit(prompt, params, on_event)   # any thread; on_event(seq, delta) from the loop
    scheduler.cancel(seq)                              # e.g. the client went away
    scheduler.stop()

The loop owns one `Batch` of `engine.max_batch_size` rows and turns the batch's admit/step loop
(`Batch.turn`, the same one `Engine.generate` runs): before each decode step it frees the rows of
cancelled requests and admits waiting ones into free rows (one right-padded prefill for all of them,
a prompt shared by n choices prefilled once, then a copy into the rows of the big cache); a request
leaves its row as soon as it finishes. Rows never share cache entries, so a request's output does not depend on which
others run beside it. Callbacks run on the loop thread and must be quick (hand the delta to a
queue). If a step fails, every request in it finishes with reason "error" and the exception in
`seq.error`; the loop keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from nanoseek.infer.batch import Batch
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.sequence import GenerationStats, Prompt, Sequence

log = logging.getLogger(__name__)


class Scheduler:
    """A background decode loop over a batch shared by all submitted requests."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = GenerationStats()
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> Scheduler:
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="nanoseek-scheduler", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the current step, end every request (reason "cancelled") and join the thread."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    def submit(self, prompt: Prompt, params: SamplingParams,
               on_event: Callable[[Sequence, str], None] | None = None) -> Sequence:
        """Queue a request (ValueError for a bad one, before queueing); returns its Sequence."""
        seq = self.engine.sequence(prompt, params, on_event)
        with self._cond:
            if self._thread is None or self._stopping:
                raise RuntimeError("the scheduler is not running; call start() first")
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    @property
    def waiting(self) -> int:
        """Requests queued for a row (not yet admitted)."""
        return len(self._waiting)

    def cancel(self, seq: Sequence) -> None:
        """Stop a request at the next step boundary (its row is freed)."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify_all()

    def _loop(self) -> None:
        batch = Batch(self.engine, self.engine.max_batch_size)
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or batch.busy):
                    self._cond.wait()
                if self._stopping:
                    break
                events = []
                for seq in [s for s in self._waiting if s.cancelled]:
                    self._waiting.remove(seq)
                    seq.finish("cancelled")
                    events.append((seq, ""))
            admitted: list[Sequence] = []

            def take(free: int, admitted: list[Sequence] = admitted) -> list[Sequence]:
                with self._cond:
                    while self._waiting and len(admitted) < free:
                        admitted.append(self._waiting.popleft())
                return list(admitted)

            try:
                events += batch.turn(take, self.stats)
            except Exception as e:  # a failed step must not take the server down
                log.exception("decode step failed; failing the requests in it")
                failed = {id(s): s for s in batch.running() + admitted if not s.finished}
                batch = Batch(self.engine, self.engine.max_batch_size)
                for s in failed.values():
                    s.finish("error", e)
                    events.append((s, ""))
            self._dispatch(events)
        with self._cond:
            leftover = [s for s in batch.running() + list(self._waiting) if not s.finished]
            self._waiting.clear()
        for s in leftover:
            s.finish("cancelled")
        self._dispatch([(s, "") for s in leftover])

    @staticmethod
    def _dispatch(events: list[tuple[Sequence, str]]) -> None:
        for seq, delta in events:
            if seq.on_event is not None:
                try:
                    seq.on_event(seq, delta)
                except Exception:
                    log.exception("on_event callback failed")
