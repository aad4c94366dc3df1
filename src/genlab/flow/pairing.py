"""Minibatch OT pairing in the data pipeline: the next batch is drawn and paired while this step trains.

The OT permutation of a batch needs only (x0, x1), never the model, so it need not sit on the
training step's critical path. ``OTPairedSource`` wraps any batch source (``train.data.BatchSource``)
and hands out batches that are already paired: x1 and every per-row extra that belongs to it
(class labels, ...) re-ordered by ``coupling.ot_pairing``. While the engine trains on batch k, one
background thread draws batch k + 1 from the inner source and solves its assignment. POT's network
simplex runs in C++ with the GIL released, so on a machine with a spare core the pairing costs the
step (almost) nothing; the loss then runs with ``coupling="none"`` on the paired batch.

    >>> data = OTPairedSource(Toy2DSource("8gaussians", "moons", seed=0), method="exact")
    >>> batch = data.next_batch(256)       # paired; batch 2 is being paired from now on
    >>> data.close()                       # stops the thread (also a context manager)

Exactness, the three promises:

* the same pairs: each batch gets the very permutation the in-step pairing
  (``flow_matching_loss(..., coupling=method)``) would give it, pairing each chunk of ``chunk`` rows
  on its own, as the in-step pairing pairs each micro-batch (``chunk=0``: the whole batch);
* the same batches: the inner source is only ever asked for the batches the engine asks for, in
  order, so it must draw with its own generators (all genlab sources do), not torch's global RNG;
* the same resume: ``state_dict`` is the inner source's state *before* the prefetched batch, so a run
  resumed from a checkpoint draws exactly what the uninterrupted run drew, bit for bit.

Threading: the inner source is touched by the worker thread only, except while the worker is idle
(``state_dict`` before the first batch, ``load_state_dict``, and the capture of the state before
each prefetch). At most one batch is in flight; the thread is a daemon, stopped by ``close``.
"""

from __future__ import annotations

import copy
import queue
import threading
import weakref
from typing import Any

import torch

from genlab.flow.coupling import METHODS, ot_pairing
from genlab.train.data import BatchSource

_STOP = None  # the request that ends the worker


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


def _worker(source: BatchSource, method: str, reg: float, chunk: int, requests: queue.Queue,
            results: queue.Queue) -> None:
    """Answer each request n with (n, paired batch, None) or (n, None, error) until _STOP."""
    while True:
        n = requests.get()
        if n is _STOP:
            return
        try:
            results.put((n, pair_rows(source.next_batch(n), method, reg, chunk), None))
        except BaseException as e:  # handed to the caller of next_batch, who re-raises it
            results.put((n, None, e))


def _stop(requests: queue.Queue, thread: threading.Thread) -> None:
    requests.put(_STOP)  # never blocks: at most one request is queued besides this one
    if thread is not threading.current_thread():
        thread.join()


class OTPairedSource:
    """A batch source whose batches come OT-paired, the next one prepared in a background thread.

    source: any ``BatchSource`` yielding at least "x0" and "x1"; method: "exact" or "sinkhorn"
    (``ot_pairing``'s; "none" would pair nothing, so it is refused); reg: Sinkhorn's regularisation;
    chunk: pair each run of ``chunk`` rows on its own (the engine's micro-batch size; 0 = whole batch).
    Train with ``coupling="none"`` on what it returns. See the module docstring for the guarantees.
    """

    def __init__(self, source: BatchSource, method: str = "exact", reg: float = 0.05, chunk: int = 0) -> None:
        if method not in METHODS or method == "none":
            raise ValueError(f"OTPairedSource pairs by 'exact' or 'sinkhorn', got {method!r}")
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0 (0 = the whole batch), got {chunk}")
        self.source, self.method, self.reg, self.chunk = source, method, reg, chunk
        self._requests: queue.Queue = queue.Queue(maxsize=2)  # one batch request + the stop request
        self._results: queue.Queue = queue.Queue(maxsize=1)  # one batch in flight, never more
        self._pending: int | None = None  # rows of the batch being prefetched
        self._state_before: Any = None  # the inner state before that batch
        self._thread = threading.Thread(target=_worker, name="genlab-ot-pairing", daemon=True,
                                        args=(source, method, reg, chunk, self._requests, self._results))
        self._thread.start()
        # The worker holds no reference to self, so a source that is dropped unclosed still stops it.
        self._close = weakref.finalize(self, _stop, self._requests, self._thread)

    @property
    def closed(self) -> bool:
        return not self._close.alive

    def _request(self, n: int) -> None:
        """Start drawing and pairing the next batch of n rows (the worker is idle)."""
        self._state_before = copy.deepcopy(self.source.state_dict())
        self._requests.put(n)
        self._pending = n

    def _take(self) -> tuple[int, dict[str, Any] | None, BaseException | None]:
        out = self._results.get()
        self._pending = None
        return out

    def _drop_prefetch(self) -> None:
        """Wait for the batch in flight, discard it and put the inner source back before it."""
        if self._pending is not None:
            self._take()
            self.source.load_state_dict(self._state_before)

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        """The next batch of ``n`` rows, paired; the one after it is prepared from now on."""
        if self.closed:
            raise RuntimeError("OTPairedSource.next_batch after close()")
        if self._pending != n:  # first call, after a resume, or a new batch size: fetch it now
            self._drop_prefetch()
            self._request(n)
        _, batch, error = self._take()
        if error is not None:
            raise error
        self._request(n)  # batch k + 1 is drawn and paired while the caller trains on batch k
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The inner source's state after the last batch handed out (before the one in flight)."""
        return self._state_before if self._pending is not None else self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drop_prefetch()
        self.source.load_state_dict(state)

    def close(self) -> None:
        """Stop the worker thread (after the batch in flight, which is dropped: the inner source is left
        just after the last batch handed out, so ``state_dict`` stays right); idempotent."""
        self._close()
        self._drop_prefetch()

    def __enter__(self) -> "OTPairedSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OTPairedSource({self.source!r}, method={self.method!r}, chunk={self.chunk})"
