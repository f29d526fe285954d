"""Preemption: a SIGTERM (what a TPU VM, Kubernetes or Slurm sends before taking the machine)
asks train.py to stop at the next step boundary; it saves a checkpoint there and exits 0,
saying where the checkpoint is and that the same command resumes it.

One process: a SIGTERM handler that only notes the signal; the training loop asks
:meth:`StopRequest.due` after each step. Several processes (``jax.distributed``): every host
must save the same step, so the loop asks JAX's preemption sync point
(``multihost_utils.reached_preemption_sync_point``: the preemption notifier that
``jax.distributed.initialize`` sets up catches a SIGTERM on any host and the hosts agree on the
step to stop at); no handler of ours is installed then (it would replace the notifier's).
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading

import jax


class Stopped(SystemExit):
    """The run stopped on request after saving its checkpoint: exit status 0."""

    def __init__(self):
        super().__init__(0)


def _sync_manager():
    """JAX's preemption sync manager (None without ``jax.distributed`` or with the service off)."""
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager


class StopRequest:
    """Whether the run was asked to stop (a context manager: the SIGTERM handler is installed on
    entry, in the main thread of a one-process run, and the previous one put back on exit)."""

    def __init__(self):
        self.signal = None  # the name of the signal received
        self.synced = jax.process_count() > 1 and _sync_manager() is not None
        self.previous = None

    def __enter__(self):
        if not self.synced and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def _note(self, signum, frame) -> None:
        """The handler: notes the signal, nothing else (the loop acts on it)."""
        self.signal = signal.Signals(signum).name

    def due(self, step: int) -> bool:
        """Whether to stop once step ``step`` (the number of steps done) is saved; with several
        processes a collective, called by every process after every step."""
        if self.synced:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = "a preemption notice"
        return self.signal is not None

    def stop(self, step: int, total: int, checkpoints) -> Stopped:
        """The exception ending the run stopped after ``step`` of ``total`` steps (its checkpoint
        saved in ``checkpoints``), after printing the line saying how to resume."""
        if jax.process_index() == 0:
            print(f"stopped by {self.signal} after step {step} of {total}: checkpoint {step} saved "
                  f"in {checkpoints}; resume with the same command: python {shlex.join(sys.argv)}",
                  flush=True)
        return Stopped()
