"""FastV-style visual token pruning (pure functions of arrays; jit / vmap-able, static shapes).

B batch, H heads, T tokens (queries = keys here: the prefill of one sequence), T' = T - n_drop.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def attention_received(weights, mask, mode: str = "last"):
    """How much attention each token received in one layer.

    Args:
      weights: [B, H, T, T] attention probabilities (rows: queries).
      mask: [B, T] 1 = a query that votes (a real prompt token: padding and, in likelihood
        scoring, the candidate answer do not vote) or None (every query).
      mode: "last" (the last voting query, averaged over heads: FastV's code,
        ``last_layer_attention_avg[-1]``; left and right padding alike) or "mean" (averaged over
        heads and every voting query: the FastV paper's text).
    Returns:
      [B, T] float32.
    """
    chex.assert_rank(weights, 4)
    w = jnp.mean(weights.astype(jnp.float32), axis=1)                              # [B, T, T]
    b, t, _ = w.shape
    m = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
    if mode == "last":
        last = jnp.max(jnp.where(m > 0, jnp.arange(t)[None], 0), axis=1)
        return jnp.take_along_axis(w, last[:, None, None], axis=1)[:, 0]
    return jnp.einsum("bq,bqk->bk", m, w) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)


def keep_indices(scores, visual, protect, n_drop: int):
    """Indices of the tokens kept, in sequence order: every non-visual token, then the visual
    tokens by score, protected (sink) visual tokens before unprotected ones.

    Args:
      scores: [B, T] attention received; visual: [B, T] bool visual-token slots; protect: [B, T]
        bool visual tokens that are never dropped (ViT sinks) or None; n_drop: static count of
        visual tokens dropped per row (each row must hold at least that many visual tokens).
    Returns:
      [B, T - n_drop] int32, ascending.
    """
    chex.assert_equal_shape([scores, visual])
    t = scores.shape[1]
    s = jnp.where(visual, scores.astype(jnp.float32), jnp.inf)
    if protect is not None:
        s = jnp.where(visual & protect, jnp.float32(3e38), s)
    _, idx = jax.lax.top_k(s, t - n_drop)
    return jnp.sort(idx, axis=1).astype(jnp.int32)


def gather_tokens(x, idx):
    """x [B, T, ...] -> [B, T', ...] at idx [B, T']."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def scatter_tokens(x, idx, length: int):
    """Inverse of :func:`gather_tokens` into zeros: x [B, T', ...] -> [B, length, ...]."""
    b = x.shape[0]
    out = jnp.zeros((b, length) + x.shape[2:], x.dtype)
    return out.at[jnp.arange(b)[:, None], idx].set(x)
