"""Minibatch OT pairing in the data pipeline: the next batches are drawn and paired while this step trains.

The OT permutation of a batch needs only (x0, x1), never the model, so it need not sit on the
training step's critical path. ``OTPairedSource`` wraps any batch source (``train.data.BatchSource``)
and hands out batches that are already paired: x1 and every per-row extra that belongs to it
(class labels, ...) re-ordered by ``coupling.ot_pairing``. While the engine trains on batch k,
background threads draw batches k + 1, ..., k + depth from the inner source and solve their
assignments. POT's network simplex runs in C++ with the GIL released, so on a machine with a spare
core the pairing costs the step (almost) nothing; the loss then runs with ``coupling="none"`` on the
paired batch. ``depth`` = 2 (the default) keeps one batch in reserve, so a pairing that is now and
then slower than the step does not stall it; ``workers`` = 2 would also run two assignments side by
side, which on 2 cores mostly takes a core from the step (see docs/benchmarks.md).

    >>> data = OTPairedSource(Toy2DSource("8gaussians", "moons", seed=0), method="exact")
    >>> batch = data.next_batch(256)       # paired; batches 2 and 3 are being paired from now on
    >>> data.close()                       # stops the threads (also a context manager)

Exactness, the three promises:

* the same pairs: each batch gets the very permutation the in-step pairing
  (``flow_matching_loss(..., coupling=method)``) would give it, pairing each chunk of ``chunk`` rows
  on its own, as the in-step pairing pairs each micro-batch (``chunk=0``: the whole batch);
* the same batches: the inner source is only ever asked for the batches the engine asks for, in
  order (the workers draw one at a time, in the order of the requests; only the pairings overlap),
  so it must draw with its own generators (all genlab sources do), not torch's global RNG;
* the same resume: ``state_dict`` is the inner source's state *before* the oldest prefetched batch,
  so a run resumed from a checkpoint draws exactly what the uninterrupted run drew, bit for bit.

Threading: the workers touch the inner source only while holding the draw lock, which a worker
keeps from taking a request off the queue until its batch is drawn; that makes the draws sequential
and in request order. The caller's thread touches it only when no batch is in flight (``state_dict``
then, ``load_state_dict``, and putting it back when prefetched batches are dropped). At most
``depth`` batches are in flight, over ``workers`` threads; they are daemons, stopped by ``close``.
"""

from __future__ import annotations

import collections
import copy
import queue
import threading
import weakref
from typing import Any

import torch

from genlab.flow.coupling import METHODS, ot_pairing
from genlab.train.data import BatchSource

_STOP = None  # the request that ends a worker


def pair_rows(batch: dict[str, Any], method: str = "exact", reg: float = 0.05, chunk: int = 0) -> dict[str, Any]:
    """``batch`` with "x1" and its per-row extras re-ordered by ``ot_pairing(x0, x1)``, chunk by chunk.

    Every tensor other than "x0" whose first dim is the batch size follows x1, as in
    ``flow_matching_loss``. ``chunk`` > 0 pairs rows [0, chunk), [chunk, 2 chunk), ... separately
    (the engine's micro-batches); 0 pairs the whole batch.
    """
    x0, x1 = batch["x0"], batch["x1"]
    n = x1.shape[0]
    step = chunk if 0 < chunk < n else n
    perm = torch.cat([start + ot_pairing(x0[start:start + step], x1[start:start + step], method=method, reg=reg)
                      for start in range(0, n, step)])  # (n,) indices into the whole batch
    return {k: v[perm] if k != "x0" and torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n else v
            for k, v in batch.items()}


class _Job:
    """One prefetched batch of n rows: the inner state before it, then the paired batch or the error."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.state_before: Any = None
        self.batch: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.drawn = threading.Event()  # state_before is set (and the batch drawn, or failed)
        self.done = threading.Event()  # batch or error is set


def _worker(source: BatchSource, method: str, reg: float, chunk: int, requests: queue.Queue,
            draw_lock: threading.Lock) -> None:
    """Draw (in request order, under draw_lock) and pair each requested _Job until _STOP."""
    while True:
        with draw_lock:  # held from taking the request to the end of its draw: draws go in order
            job = requests.get()
            if job is _STOP:
                return
            try:
                job.state_before = copy.deepcopy(source.state_dict())
                raw = source.next_batch(job.n)
            except BaseException as e:  # handed to the caller of next_batch, who re-raises it
                job.error = e
            finally:
                job.drawn.set()
        try:
            if job.error is None:
                job.batch = pair_rows(raw, method, reg, chunk)  # outside the lock: pairings overlap
        except BaseException as e:
            job.error = e
        finally:
            raw = None
            job.done.set()


def _stop(requests: queue.Queue, threads: list[threading.Thread]) -> None:
    for _ in threads:
        requests.put(_STOP)  # never blocks: at most depth requests are queued besides these
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join()


class OTPairedSource:
    """A batch source whose batches come OT-paired, the next ``depth`` prepared in background threads.

    source: any ``BatchSource`` yielding at least "x0" and "x1"; method: "exact" or "sinkhorn"
    (``ot_pairing``'s; "none" would pair nothing, so it is refused); reg: Sinkhorn's regularisation;
    chunk: pair each run of ``chunk`` rows on its own (the engine's micro-batch size; 0 = whole batch);
    depth: batches in flight (1: batch k + 1 only); workers: threads pairing them (1 <= workers <= depth).
    Train with ``coupling="none"`` on what it returns. See the module docstring for the guarantees.
    """

    def __init__(self, source: BatchSource, method: str = "exact", reg: float = 0.05, chunk: int = 0,
                 depth: int = 2, workers: int = 1) -> None:
        if method not in METHODS or method == "none":
            raise ValueError(f"OTPairedSource pairs by 'exact' or 'sinkhorn', got {method!r}")
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0 (0 = the whole batch), got {chunk}")
        if depth < 1 or not 1 <= workers <= depth:
            raise ValueError(f"need depth >= 1 and 1 <= workers <= depth, got depth={depth}, workers={workers}")
        self.source, self.method, self.reg, self.chunk = source, method, reg, chunk
        self.depth, self.workers = depth, workers
        self._requests: queue.Queue = queue.Queue(maxsize=depth + workers)  # the requests + the stops
        self._jobs: collections.deque[_Job] = collections.deque()  # in flight, oldest first
        draw_lock = threading.Lock()
        self._threads = [threading.Thread(target=_worker, name="genlab-ot-pairing", daemon=True,
                                          args=(source, method, reg, chunk, self._requests, draw_lock))
                         for _ in range(workers)]
        for thread in self._threads:
            thread.start()
        # The workers hold no reference to self, so a source that is dropped unclosed still stops them.
        self._close = weakref.finalize(self, _stop, self._requests, self._threads)

    @property
    def closed(self) -> bool:
        return not self._close.alive

    def _request(self, n: int) -> None:
        """Queue the next batch of n rows (fewer than depth are in flight, so this never blocks)."""
        job = _Job(n)
        self._requests.put(job)
        self._jobs.append(job)

    def _drop_prefetch(self) -> None:
        """Wait for the batches in flight, discard them and put the inner source back before the oldest."""
        if not self._jobs:
            return
        for job in self._jobs:
            job.done.wait()
        oldest = self._jobs[0].state_before
        self._jobs.clear()
        if oldest is not None:  # None: its state_dict() failed; the source is left as it is
            self.source.load_state_dict(oldest)

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        """The next batch of ``n`` rows, paired; the ``depth`` after it are prepared from now on."""
        if self.closed:
            raise RuntimeError("OTPairedSource.next_batch after close()")
        if not self._jobs or self._jobs[0].n != n:  # first call, after a resume, or a new batch size
            self._drop_prefetch()
        while len(self._jobs) < self.depth:
            self._request(n)
        self._jobs[0].done.wait()  # popped only once done: an interrupted wait loses no batch
        job = self._jobs.popleft()
        if job.error is not None:
            self._drop_prefetch()  # the batches drawn after the failed one are redone by the next call
            raise job.error
        self._request(n)  # batch k + depth is drawn and paired while the caller trains on batch k
        return job.batch

    def state_dict(self) -> dict[str, Any]:
        """The inner source's state after the last batch handed out (before the oldest one in flight)."""
        if not self._jobs:
            return self.source.state_dict()
        self._jobs[0].drawn.wait()
        return self._jobs[0].state_before

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drop_prefetch()
        self.source.load_state_dict(state)

    def close(self) -> None:
        """Stop the worker threads (after the batches in flight, which are dropped: the inner source is
        left just after the last batch handed out, so ``state_dict`` stays right); idempotent."""
        self._close()
        self._drop_prefetch()

    def __enter__(self) -> "OTPairedSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OTPairedSource({self.source!r}, method={self.method!r}, chunk={self.chunk}, depth={self.depth}, workers={self.workers})"
