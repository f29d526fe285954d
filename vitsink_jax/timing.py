"""Wall-clock helpers for the speed figures (benchmarks/ and evaluate.py's interventions mode):
contenders timed in turns on the same machine, medians, never an absolute time in a test.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from .generate import prefill


def interleaved_times(fns: dict, repeats: int, warmup: bool = True) -> dict:
    """{name: [wall time of ``fn()`` in each round]} (blocked on its result) with the calls
    taking turns, one of each per round, so that a slow spell of a shared machine hits every
    contender alike; one warm-up (compile) call each first unless ``warmup=False``."""
    if warmup:
        for fn in fns.values():
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_seconds(fns: dict, repeats: int, warmup: bool = True) -> dict:
    """{name: median wall time of ``fn()``} (see :func:`interleaved_times`)."""
    return {name: float(np.median(t)) for name, t in interleaved_times(fns, repeats, warmup).items()}


def time_ratios(times: dict, reference: str) -> dict:
    """{name: {"median", "min", "max"}} of each round's time over ``reference``'s time in the
    same round (``times`` from :func:`interleaved_times`): x of the reference's time, with the
    spread over rounds as the run's noise."""
    ref = np.asarray(times[reference])
    return {name: {stat: float(fn(np.asarray(t) / ref)) for stat, fn in
                   (("median", np.median), ("min", np.min), ("max", np.max))}
            for name, t in times.items()}


def median_seconds(fn, repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn()`` (see :func:`interleaved_seconds`)."""
    return interleaved_seconds({"fn": fn}, repeats, warmup)["fn"]


def prefill_call(model, params, batch: dict):
    """A no-argument call of the jitted forward (the prefill) over ``batch`` (ids, mask, pixels;
    question: the question mask, needed by a DIYSink ReW model)."""
    fwd = jax.jit(lambda p, i, x, m, q: model.apply({"params": p}, i, x, attention_mask=m,
                                                    question_mask=q).logits)
    return lambda: fwd(params, batch["ids"], batch["pixels"], batch["mask"], batch.get("question"))


def decode_call(model, params, batch: dict, steps: int = 16):
    """A no-argument call of a compiled loop of ``steps`` greedy KV-cache decode steps from the
    prefilled cache of ``batch`` (left_ids, left_mask, pixels: left-padded prompts;
    left_question: their question mask, needed by a DIYSink ReW model)."""
    out = jax.jit(lambda p, i, m, x, q: prefill(model, p, i, m, x, steps + 1, question_mask=q))(
        params, batch["left_ids"], batch["left_mask"], batch["pixels"], batch.get("left_question"))
    first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)

    @jax.jit
    def loop(p, cache, tok):
        def body(_, carry):
            cache, tok = carry
            step = model.apply({"params": p}, tok[:, None], cache, method=type(model).decode)
            return step.cache, jnp.argmax(step.logits[:, -1], axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (cache, tok))

    return lambda: loop(params, out.cache, first)
