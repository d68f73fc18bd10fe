"""Dynamic batching: concurrent requests for one model share one graph run.

Each request thread hands its model input [1,3,H,W] and targets [K] to the model's
``Batcher``. The batcher has no thread of its own: the request that finds no run going
leads. It takes the oldest job, adds the jobs queued behind it that ask for the same layers
(up to ``max_batch_size``, waiting at most ``max_queue_delay`` for more while other requests
are still being prepared), pads the targets to a common K with -1 (the predicted class; the
padding is dropped again), runs the graph once on its own thread and hands each job its
rows. Requests that arrive meanwhile queue; when the run ends, the thread of the oldest
queued job leads the next batch. A lone request therefore runs at once on its caller's
thread, with no hand-off to another thread and back (on a busy 2-core machine those two
wake-ups cost more than the batching saved), and under load batches form as before.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from camserve.errors import CamserveError, DeadlineError
from camserve.server.metrics import Metrics
from camserve.server.runtime import ExplainerModel

# (logits [1,N], classes [1,K], {layer: (activations [1,C,h,w], gradients [1,K,C,h,w])})
Result = tuple[np.ndarray, np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]


@dataclass(eq=False)  # jobs are compared by identity (their arrays have no truth value)
class _Job:
    image: np.ndarray  # [1,3,H,W]
    targets: np.ndarray  # [K]
    layers: tuple[str, ...]
    alive: Callable[[], bool]  # False once the caller's deadline passed or it cancelled
    future: Future = field(default_factory=Future)
    # set when the result is in, or when the job's thread is to lead the next run
    wake: threading.Event = field(default_factory=threading.Event)

    def finish(self, result: Result | None = None, error: BaseException | None = None) -> None:
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)
        self.wake.set()


class Batcher:
    """Runs one model's requests in batches; ``run`` blocks until its result is ready."""

    def __init__(self, model: ExplainerModel, max_batch_size: int = 8,
                 max_queue_delay: float = 0.002, metrics: Metrics | None = None) -> None:
        if max_batch_size < 1 or max_queue_delay < 0:
            raise CamserveError("dynamic batching needs max batch size >= 1 and a queue "
                                "delay >= 0")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self._jobs: deque[_Job] = deque()
        self._waiting = 0  # request threads between "about to submit" and their result
        self._leading = False  # a request thread is collecting or running a batch
        self._ready = threading.Condition()
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # how many runs had each batch size
        self.metrics = metrics

    @property
    def pending(self) -> int:
        """Requests expected or queued and not answered yet."""
        with self._ready:
            return self._waiting

    @property
    def closed(self) -> bool:
        """True once ``close`` was called (the repository closes a replaced model's
        batcher when its last call ends)."""
        with self._ready:
            return self._closed

    def expect(self) -> None:
        """A request has started preparing its input; a batch may wait for it."""
        with self._ready:
            self._waiting += 1

    def cancel(self) -> None:
        """A request that called ``expect`` will not submit after all."""
        with self._ready:
            self._waiting -= 1
            self._ready.notify_all()

    def run(self, image: np.ndarray, targets: np.ndarray, layers: list[str],
            alive: Callable[[], bool] = lambda: True) -> Result:
        """Queue one image (after ``expect``) and wait for its share of a batched run,
        leading runs on this thread whenever it is this job's turn.

        A job whose caller is gone by the time its batch forms is dropped, not run."""
        job = _Job(image, targets, tuple(layers), alive)
        with self._ready:
            if self._closed:
                self._waiting -= 1
                raise CamserveError("the server is shutting down")
            self._jobs.append(job)
            lead = not self._leading
            self._leading = True
            self._ready.notify_all()  # a leader waiting for more jobs sees this one
            if self.metrics:
                self.metrics.queue_depth.labels(self.model.name).set(len(self._jobs))
        try:
            while True:
                if lead:
                    self._lead()
                job.wake.wait()
                if job.future.done():
                    return job.future.result()
                job.wake.clear()  # not done: the last leader handed this thread the lead
                lead = True
        finally:
            with self._ready:
                self._waiting -= 1
                self._ready.notify_all()

    def close(self) -> None:
        """Refuse new jobs; the queued ones still run (their threads lead them)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _lead(self) -> None:
        """Collect and run one batch, then hand the lead to the oldest queued job's thread
        (or give it up when none is queued)."""
        try:
            with self._ready:
                batch = self._collect()
            self._execute(batch)
        finally:
            with self._ready:
                if self._jobs:
                    self._jobs[0].wake.set()
                else:
                    self._leading = False

    def _collect(self) -> list[_Job]:
        """The next batch (called holding the lock): the oldest job plus compatible ones."""
        first = self._jobs.popleft()
        batch = [first]
        deadline = time.monotonic() + self.max_queue_delay
        while len(batch) < self.max_batch_size:
            match = next((job for job in self._jobs if job.layers == first.layers), None)
            if match is not None:
                self._jobs.remove(match)
                batch.append(match)
                continue
            remaining = deadline - time.monotonic()
            # wait only while more requests are on their way
            if remaining <= 0 or self._waiting <= len(batch) + len(self._jobs):
                break
            self._ready.wait(remaining)
        return batch

    def _execute(self, batch: list[_Job]) -> None:
        """Run ``batch`` as one graph run; every job gets its rows or the failure."""
        for job in [job for job in batch if not job.alive()]:
            job.finish(error=DeadlineError("the caller gave up while queued"))
            batch.remove(job)
        if not batch:
            return
        self.batch_sizes[len(batch)] += 1
        if self.metrics:
            self.metrics.batch_size.labels(self.model.name).observe(len(batch))
            with self._ready:
                self.metrics.queue_depth.labels(self.model.name).set(len(self._jobs))
        try:
            width = max(len(job.targets) for job in batch)
            targets = np.full((len(batch), width), -1, np.int64)
            for row, job in enumerate(batch):
                targets[row, :len(job.targets)] = job.targets
            images = np.concatenate([job.image for job in batch]) if len(batch) > 1 \
                else batch[0].image
            logits, classes, per_layer = self.model.run(images, targets, list(batch[0].layers))
        except BaseException as exc:
            for job in batch:
                job.finish(error=exc)
            if not isinstance(exc, Exception):
                raise
            return
        for row, job in enumerate(batch):
            k = len(job.targets)
            job.finish((
                logits[row:row + 1], classes[row:row + 1, :k],
                {name: (a[row:row + 1], g[row:row + 1, :k]) for name, (a, g) in per_layer.items()}))
