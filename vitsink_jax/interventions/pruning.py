"""FastV-style visual token pruning and its attention debiasing (pure functions of arrays; jit /
vmap-able, static shapes).

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


def visual_index(visual):
    """visual [B, T] bool -> [B, T] int32: each visual slot's index among its row's visual
    tokens (0, 1, ... in sequence order), -1 at the other slots."""
    v = visual.astype(bool)
    return jnp.where(v, jnp.cumsum(v, axis=1) - 1, -1).astype(jnp.int32)


def recency_slope(scores, visual, fitted=None):
    """The recency trend of each row's visual-token scores: the least-squares b of
    log(score_i) = c + b i over the row's visual tokens i (an exponential trend a e^(b i) in the
    visual index, the trend model of Zhao et al. 2025, fitted to the row itself).

    Args:
      scores: [B, T] attention received (> 0 at visual tokens); visual: [B, T] bool visual-token
        slots (they number i); fitted: [B, T] bool, the visual tokens fitted (None: all; the
        padding left out).
    Returns:
      [B] float32 (0 for a row with fewer than 2 fitted tokens).
    """
    chex.assert_equal_shape([scores, visual])
    v = (visual if fitted is None else fitted).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v, axis=1, keepdims=True), 1.0)
    i = visual_index(visual).astype(jnp.float32)
    y = jnp.log(jnp.maximum(scores.astype(jnp.float32), jnp.finfo(jnp.float32).tiny))
    di = (i - jnp.sum(v * i, axis=1, keepdims=True) / n) * v
    dy = (y - jnp.sum(v * y, axis=1, keepdims=True) / n) * v
    var = jnp.sum(di * di, axis=1)
    return jnp.where(var > 0, jnp.sum(di * dy, axis=1) / jnp.where(var > 0, var, 1.0), 0.0)


def debiased_scores(scores, visual, mode: str = "fit", position_weights=(), padding=None):
    """Attention debiasing for token pruning (Zhao et al., "Attention Debiasing for Token Pruning
    in Vision-Language Models", arXiv 2508.17807; code intcomp/attention-bias): the FastV score
    with the position (recency) trend and the sink attention of padding removed before ranking.

    Args:
      scores: [B, T] attention received (:func:`attention_received`); visual: [B, T] bool.
      mode: "fit" (the score divided by its exponential recency trend, fitted per row by
        :func:`recency_slope`: score x e^(-b i); the trend's scale is one constant per row and
        does not change the ranking) or "weights" (the authors' code: score x
        ``position_weights[i]``, their trend fitted offline on a data set, w_i = trend_0 /
        trend_i, e.g. their FastV weight.npy for LLaVA-1.5's 576 tokens).
      position_weights: P floats, one per visual index (mode "weights"; P = the row's visual
        tokens).
      padding: [B, T] bool visual tokens that show the padding of a padded (square) image, or
        None: their score becomes 0 (the authors' sink suppression) and "fit" leaves them out.
    Returns:
      [B, T] float32, the non-visual slots unchanged.
    """
    chex.assert_equal_shape([scores, visual])
    s = scores.astype(jnp.float32)
    fitted = visual if padding is None else visual & ~padding
    i = visual_index(visual)
    if mode == "fit":
        factor = jnp.exp(-recency_slope(s, visual, fitted)[:, None] * i.astype(jnp.float32))
    elif mode == "weights":
        w = jnp.asarray(position_weights, jnp.float32)
        factor = w[jnp.clip(i, 0, w.shape[0] - 1)]
    else:
        raise ValueError(f"attention debiasing mode {mode!r}: fit | weights")
    s = jnp.where(visual, s * factor, s)
    return s if padding is None else jnp.where(visual & padding, 0.0, s)


def select(prune, weights, attention_mask, prompt_mask, visual, sinks, num_visual: int):
    """FastV's choice after layer K (``prune``: a TokenPruning): the visual tokens ranked by the
    attention they received in layer K-1 from the voting queries (the real tokens of
    ``attention_mask``, those of ``prompt_mask`` only when given), debiased first when
    ``prune.debias`` is set; all but the int(ratio x ``num_visual``) least attended are kept
    (never a ViT sink of ``sinks`` with ``keep_sinks``).

    Args:
      weights: [B, H, T, T] layer K-1's attention probabilities; attention_mask, prompt_mask:
        [B, T] or None; visual, sinks: [B, T] bool visual-token slots and ViT sinks.
    Returns:
      kept [B, T - dropped] int32 sequence indices, ascending.
    """
    voters = attention_mask
    if prompt_mask is not None:
        voters = prompt_mask if voters is None else voters.astype(bool) & prompt_mask.astype(bool)
    scores = attention_received(weights, voters, prune.score)
    if prune.debias != "none":
        if prune.debias == "weights" and len(prune.position_weights) != num_visual:
            raise ValueError(f"attention debiasing: {len(prune.position_weights)} position_weights "
                             f"for {num_visual} visual tokens per row")
        scores = debiased_scores(scores, visual, prune.debias, prune.position_weights)
    return keep_indices(scores, visual, sinks if prune.keep_sinks else None,
                        prune.dropped(num_visual))


def gather_tokens(x, idx):
    """x [B, T, ...] -> [B, T', ...] at idx [B, T']."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def scatter_tokens(x, idx, length: int):
    """Inverse of :func:`gather_tokens` into zeros: x [B, T', ...] -> [B, length, ...]."""
    b = x.shape[0]
    out = jnp.zeros((b, length) + x.shape[2:], x.dtype)
    return out.at[jnp.arange(b)[:, None], idx].set(x)
