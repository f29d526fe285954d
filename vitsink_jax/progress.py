"""Progress of long work (loading, saving, scoring, training) that reads well wherever it goes.

On a terminal: a tqdm bar. Anywhere else (a CI log, a pod job's log file, a pipe) a bar's
carriage-return refreshes would pile up on one line, so :class:`ProgressLines` prints a plain
line instead each time another tenth of the work is done or a minute has passed, with the same
figures (done / total, rate, ETA and the postfix such as the loss), and one at the end.
``VITSINK_JAX_PROGRESS=bar|lines|off`` overrides the choice.

:func:`progress` takes tqdm's arguments (``total``, ``desc``, ``unit``, ``initial``,
``disable``); the object it returns supports what the project uses of a bar: iteration,
``update``, ``set_postfix``, ``close`` and ``with``. :func:`write` prints a line without
breaking a bar.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional

from tqdm.auto import tqdm

MODES = ("bar", "lines", "off")


def mode() -> str:
    """"bar" on a terminal, else "lines"; ``VITSINK_JAX_PROGRESS`` overrides."""
    chosen = os.environ.get("VITSINK_JAX_PROGRESS", "").strip().lower()
    if chosen:
        if chosen not in MODES:
            raise ValueError(f"VITSINK_JAX_PROGRESS={chosen!r} is not one of {', '.join(MODES)}")
        return chosen
    return "bar" if sys.stderr.isatty() else "lines"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLines:
    """tqdm's interface, printing one line per ``step`` of the total (a tenth) or per
    ``interval`` seconds, whichever comes first, and a last line on close."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, step: float = 0.1, interval: float = 60.0,
                 file=None, clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start_n = initial
        self.step, self.interval, self.file, self.clock = step, interval, file, clock
        self.start = self.last_time = clock()
        self.last_mark, self.last_n = self._mark(), None
        self.postfix = ""
        self.closed = False

    def _mark(self) -> int:
        return int(self.n / self.total / self.step) if self.total else 0

    def line(self) -> str:
        """The current state: ``desc: 40% 4/10 tensor [0:00:05, 0.80 tensor/s, ETA 0:00:08] loss=1.2``."""
        elapsed = self.clock() - self.start
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            head += f"{100 * self.n / self.total:3.0f}% {self.n}/{self.total} {self.unit}"
        else:
            head += f"{self.n} {self.unit}"
        eta = f", ETA {_clock((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        tail = f" {self.postfix}" if self.postfix else ""
        return f"{head} [{_clock(elapsed)}, {rate:.2f} {self.unit}/s{eta}]{tail}"

    def _emit(self) -> None:
        print(self.line(), file=self.file or sys.stderr, flush=True)
        self.last_time, self.last_mark, self.last_n = self.clock(), self._mark(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._mark() > self.last_mark or self.clock() - self.last_time >= self.interval:
            self._emit()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        del refresh
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        """The last line (unless the last one printed already shows this state)."""
        if not self.closed:
            self.closed = True
            if self.last_n != self.n:
                self._emit()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Silent(ProgressLines):
    def _emit(self) -> None:
        pass


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             unit: str = "it", initial: int = 0, disable: bool = False):
    """A progress reporter over ``iterable`` (or ``total`` units updated by hand): a tqdm bar or
    :class:`ProgressLines` (see :func:`mode`); ``disable`` or mode "off": silent."""
    chosen = "off" if disable else mode()
    if chosen == "bar":
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial)
    cls = _Silent if chosen == "off" else ProgressLines
    return cls(iterable, total=total, desc=desc, unit=unit, initial=initial)


def write(text: str) -> None:
    """A line on stdout that does not break a bar on the terminal."""
    if mode() == "bar":
        tqdm.write(text)
    else:
        print(text, flush=True)
