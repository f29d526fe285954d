"""Wall-clock helpers for the speed figures (benchmarks/ and evaluate.py's interventions mode):
contenders timed in turns on the same machine, medians, never an absolute time in a test.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from .generate import prefill


def interleaved_seconds(fns: dict, repeats: int, warmup: bool = True) -> dict:
    """{name: median wall time of ``fn()``} (blocked on its result) with the calls taking turns,
    one of each per round, so that a slow spell of a shared machine hits every contender alike;
    one warm-up (compile) call each first unless ``warmup=False``."""
    if warmup:
        for fn in fns.values():
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


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


def prefill_seconds(model, params, batch: dict, repeats: int = 5) -> float:
    """Median time of the jitted forward (the prefill) over ``batch``."""
    return median_seconds(prefill_call(model, params, batch), repeats)


def decode_step_seconds(model, params, batch: dict, steps: int = 16, repeats: int = 3) -> float:
    """Median time of one greedy KV-cache decode step over ``batch`` (:func:`decode_call`,
    divided by ``steps``)."""
    return median_seconds(decode_call(model, params, batch, steps), repeats) / steps
