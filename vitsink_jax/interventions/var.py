"""VAR, visual attention redistribution (Kang et al., ICLR 2025), as a pure function on one
layer's attention probabilities. B batch, H heads, T queries, S keys.

Rules (the method's; defaults in :class:`~vitsink_jax.interventions.AttentionRedistribution`):
for each (row, head, query) the visual attention is a = sum over visual keys and the visual-sink
share is s = (attention to visual sink keys) / a. The head is image-centric for that query when
s <= rho and a >= summ. There the attention to every sink key (visual or not) is multiplied by p
and the freed budget (1 - p) x (its attention to sinks) is added to the non-sink visual keys in
proportion to their attention, so each row still sums to 1.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp


def image_centric(weights, visual, sinks, rho: float, summ: float):
    """[B, H, T] bool: the (row, head, query) triples VAR modifies.
    weights [B, H, T, S]; visual, sinks [B, S] bool."""
    chex.assert_rank(weights, 4)
    w = weights.astype(jnp.float32)
    a = jnp.einsum("bhts,bs->bht", w, visual.astype(jnp.float32))
    vs = jnp.einsum("bhts,bs->bht", w, (visual & sinks).astype(jnp.float32))
    return (vs / (a + 1e-6) <= rho) & (a >= summ)


def redistribute(weights, visual, sinks, p: float, rho: float, summ: float):
    """VAR on attention probabilities [B, H, T, S] -> the same shape (p = 1: unchanged)."""
    chex.assert_equal_shape([visual, sinks])
    w = weights.astype(jnp.float32)
    heads = image_centric(w, visual, sinks, rho, summ)
    sink = sinks[:, None, None, :]
    budget = (1.0 - p) * jnp.sum(jnp.where(sink, w, 0.0), axis=-1, keepdims=True)
    reduced = jnp.where(sink, w * p, w)
    target = jnp.where((visual & ~sinks)[:, None, None, :], reduced, 0.0)
    ratios = target / (jnp.sum(target, axis=-1, keepdims=True) + 1e-8)
    out = jnp.where(heads[..., None], reduced + budget * ratios, w)
    return out.astype(weights.dtype)
