"""Training batches computed ahead of the step that uses them, in background threads.

train.py's batches are a pure function of the step (``vitsink_jax.train_data.Batches``: global
batch k is fixed by (seed, k), each host takes its rows), so computing the next few while the current step runs
changes nothing but the time: the order is the inline order, and a run resumed at step s (the
checkpoint's ``data_step``) asks for s, s + 1, ... and gets what a straight run got there.
Threads are enough: reading the array_record files, decoding and resizing images (PIL) and the
numpy arithmetic release the GIL; only tokenizing and Python glue hold it.

    with Prefetch(batches, range(start, steps), ahead=2, workers=2) as feed:
        for step in range(start, steps):
            batch = feed.get(step)      # fn(step), usually ready; feed.waited: seconds it took

``ahead=0`` computes each item inline when asked (no threads), so both paths share the code and
the timing. A worker's exception is raised by the ``get`` / ``next`` of the step it belongs to,
with a note naming that step, never earlier; the steps before it are served first. Leaving the
``with`` block (also by an exception or KeyboardInterrupt) or :meth:`Prefetch.close` cancels
the queued steps and waits for the ones already running (at most ``workers`` items), so no
thread outlives the run.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

_END = object()  # the steps ran out


class Prefetch:
    """Iterator of ``fn(step)`` for ``step`` in ``steps``, in that order, with up to ``ahead``
    items computed ahead by ``workers`` threads while the consumer works on the current one.

    ``waited``: seconds the last item kept the consumer waiting (the whole ``fn`` time with
    ``ahead=0``); :meth:`wait_share` the share of the consumer's time spent waiting."""

    def __init__(self, fn: Callable, steps: Iterable[int], ahead: int = 2, workers: int = 2,
                 skip: int = 1):
        if ahead < 0 or workers < 1:
            raise ValueError(f"prefetch needs ahead >= 0 and workers >= 1 (got ahead={ahead}, "
                             f"workers={workers})")
        self.fn, self.ahead, self.skip = fn, ahead, skip
        self._steps = iter(steps)
        self._pending = collections.deque()   # (step, future) in order
        self._pool = ThreadPoolExecutor(workers, "prefetch") if ahead else None
        self._served = 0                      # requests made
        self._span_wait = 0.0                 # waits of the items served from item `skip` on, ...
        self._span_from = self._span_to = None  # ... and the time from its request to the last
        self.waited, self.step, self._done, self._closed = 0.0, None, False, False

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise ValueError("the prefetch was closed")
        if self._done:
            raise StopIteration
        asked = time.perf_counter()
        if self._served > self.skip:          # the previous item's time (request to request)
            self._span_wait += self.waited
            self._span_to = asked
        elif self._served == self.skip:
            self._span_from = asked
        self._served += 1
        if not self.ahead:
            step = next(self._steps, _END)
            item = _END if step is _END else self._compute(step)
        else:
            self._fill()
            step, future = self._pending.popleft() if self._pending else (_END, None)
            try:
                item = _END if future is None else future.result()
            finally:
                self._fill()                  # keep `ahead` items going while the step runs
        if item is _END:
            self._done = True
            raise StopIteration
        self.waited = time.perf_counter() - asked
        self.step = step
        return item

    def get(self, step: int):
        """The item of ``step``, which must be the next step of ``steps``."""
        item = next(self)
        if self.step != step:
            raise ValueError(f"asked for the item of step {step}; the next one is step {self.step}")
        return item

    def _compute(self, step: int):
        try:
            return self.fn(step)
        except Exception as e:  # noqa: BLE001  (re-raised as it is, with its step named)
            e.add_note(f"(computing the item of step {step}"
                       + (" in a prefetch thread)" if self.ahead else ")"))
            raise

    def _fill(self) -> None:
        while len(self._pending) < self.ahead:
            step = next(self._steps, _END)
            if step is _END:
                return
            self._pending.append((step, self._pool.submit(self._compute, step)))

    def wait_share(self) -> Optional[float]:
        """Seconds waited / seconds elapsed over the items served after the first ``skip`` (the
        first step compiles), each item counting from its request to the next one; None until
        two such requests were made."""
        if self._span_to is None:
            return None
        return self._span_wait / max(self._span_to - self._span_from, 1e-9)

    def close(self) -> None:
        """Cancels the queued items and waits for the running ones (idempotent)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
