"""The steps of one training stage: each step run on its batch (computed ahead in threads), its
metrics logged to ``workdir/metrics.jsonl`` and TensorBoard (:class:`MetricLog`), a step whose
update was not finite skipped or the run stopped, checkpoints written as they fall due and
before a requested stop (:class:`StageLoop`).

Used by :mod:`vitsink_jax.trainer`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax

from . import paths, preemption
from .data.prefetch import Prefetch
from .progress import progress
from .tensorboard import ScalarWriter
from .train_resume import Resumed, nonfinite_error


class MetricLog:
    """metrics.jsonl (appended, one line per logged step, with the wall-clock ``time`` it was
    written) and TensorBoard scalars (process 0)."""

    def __init__(self, workdir: Path):
        self.active = jax.process_index() == 0
        if self.active:
            self.file = paths.append(workdir / "metrics.jsonl", "a")
            self.tb = ScalarWriter(workdir / "tb")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps({"step": step, **metrics, "time": time.time()}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            if v is not None:
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.file.close()
            self.tb.close()


class StageLoop:
    """The steps of a stage from ``resumed.start`` to ``cfg.steps``: each step's metrics logged,
    a step whose update was not finite skipped (``nonfinite=skip``, at most ``max_skips`` in a
    row) or the run stopped (:func:`~vitsink_jax.train_resume.nonfinite_error`), a checkpoint
    every ``checkpoint_every`` applied steps and at the end, and a SIGTERM answered with a
    checkpoint after the step it arrives in (:mod:`vitsink_jax.preemption`)."""

    def __init__(self, cfg, runner, manager, log: MetricLog, meta: dict, resumed: Resumed):
        self.cfg, self.runner, self.manager, self.log, self.meta = cfg, runner, manager, log, meta
        self.start, self.skipped = resumed.start, resumed.skipped
        self.losses, self.first_bad, self.bad_state, self.due = [], None, False, False
        self.wait_share = None  # the data-wait share of the steps run (set by run)

    def save(self, step: int, state) -> None:
        """Checkpoint ``step`` (its data position) of ``state``."""
        self.manager.save(step, self.runner.unplace(state), {**self.meta, "data_step": step,
                                                             "skipped_steps": self.skipped})

    def skip(self, step: int, state, metrics: dict) -> None:
        """A step that kept the state it was given (its update was not finite): recorded as
        skipped, or the run stopped when skips are not allowed or too many came in a row."""
        if self.first_bad is None:
            self.first_bad, self.bad_state = step, False
        self.bad_state |= not math.isfinite(metrics["loss"])
        cfg, first = self.cfg, self.first_bad
        if cfg.nonfinite == "stop" or step - first >= cfg.max_skips:
            self.log.close()
            raise nonfinite_error(self.manager, first, step, metrics, cfg, self.bad_state,
                                  lambda: self.save(first, state))
        self.skipped.append(step)
        self.log.write(step, {"skipped": 1, "loss": None})

    def applied(self, step: int, metrics: dict, tokens: float, seconds: float, waited: float, bar) -> None:
        """An applied step's metrics (with its tokens/s and data wait) logged every ``log_every``
        steps and at the last."""
        self.first_bad = None
        metrics["tokens_per_s"] = tokens * jax.process_count() / seconds
        metrics["data_wait_s"] = waited  # of this step's batch
        self.losses.append(metrics["loss"])
        if step % self.cfg.log_every == 0 or step == self.cfg.steps - 1:
            self.log.write(step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")

    def checkpoint(self, step: int, state, stop) -> None:
        """After ``step``: a checkpoint when one is due (a checkpoint falling due in a run of
        skipped steps waits for the next applied one: it would hold the state that gave them
        and push a good one out of keep_checkpoints), at the last step, or before a requested
        stop, which then ends the run."""
        cfg = self.cfg
        self.due = self.due or (step + 1) % cfg.checkpoint_every == 0
        stopping = stop.due(step + 1) and step < cfg.steps - 1  # the last step ends anyway
        if (self.due and self.first_bad is None) or step == cfg.steps - 1 or stopping:
            self.due = False
            self.save(step + 1, state)
        if stopping:
            self.log.close()
            raise stop.stop(step + 1, cfg.steps, self.manager.directory)

    def run(self, state, batches):
        """Runs the steps; returns the final state. The batches of the next steps are computed
        in threads while a step runs (the same batches in the same order); leaving the loop, by
        an exception too, stops them."""
        cfg = self.cfg
        bar = progress(range(self.start, cfg.steps), initial=self.start, total=cfg.steps,
                       desc=f"train {cfg.stage}", disable=jax.process_index() != 0)
        with Prefetch(batches, range(self.start, cfg.steps), cfg.data.prefetch, cfg.data.workers) as feed, \
                preemption.StopRequest() as stop:
            for step in bar:
                t0 = time.perf_counter()
                batch = feed.get(step)  # computed while the steps before it ran
                state, metrics = self.runner.run(state, batch)
                metrics = self.runner.host_metrics(metrics)
                if metrics.pop("applied"):
                    self.applied(step, metrics, float(batch["mask"].sum()), time.perf_counter() - t0,
                                 feed.waited, bar)
                else:
                    self.skip(step, state, metrics)
                self.checkpoint(step, state, stop)
        self.wait_share = feed.wait_share()
        self.log.close()
        return state
