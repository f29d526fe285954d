"""Training-free visual-token reduction before the LLM (pure functions of arrays; jit / vmap-able,
static output sizes). N images, P visual tokens per image, S tokens in the vision tower's
sequence, k tokens kept per image. The definitions and which choices are ours are in
:class:`~vitsink_jax.interventions.TokenReduction` and docs/interventions.md.

Indices returned by the selections are "local": into the P visual tokens of an image (what
the projector reads); -1 marks a slot that holds no single visual token (a merged token).
:func:`kept_positions` turns them into the tower's token positions.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .pruning import gather_tokens


def attention_layer(feature_layer: int, num_layers: int) -> int:
    """The encoder layer whose attention produced ``hidden_states[feature_layer]`` (the HF tuple
    of ``num_layers + 1`` states): ``attentions[i]`` belongs to the layer that writes
    ``hidden_states[i + 1]`` (FasterVLM / VisionZip read ``attentions[select_layer]`` with
    ``hidden_states[select_layer]``, select_layer < 0)."""
    at = feature_layer % (num_layers + 1) - 1
    if at < 0:
        raise ValueError(f"vision_feature_layer {feature_layer} is the embeddings: no attention "
                         "produced it, so no [CLS] attention can rank its tokens")
    return at


def cls_attention(weights, token_index):
    """The attention the [CLS] query (tower token 0) pays each visual token, heads averaged.

    Args:
      weights: [N, H, S, S] one layer's attention probabilities.
      token_index: [N, P] int tower position of each visual token.
    Returns:
      [N, P] float32.
    """
    chex.assert_rank(weights, 4)
    row = jnp.mean(weights[:, :, 0, :].astype(jnp.float32), axis=1)                  # [N, S]
    return jnp.take_along_axis(row, token_index, axis=1)


def mean_attention_received(weights, token_index):
    """Substitute for towers without a [CLS]: the attention each visual token receives,
    averaged over heads and every query (VisionZip's SigLIP code). weights [N, H, S, S],
    token_index [N, P] -> [N, P] float32."""
    chex.assert_rank(weights, 4)
    received = jnp.mean(weights.astype(jnp.float32), axis=(1, 2))                     # [N, S]
    return jnp.take_along_axis(received, token_index, axis=1)


def single_head_cls_attention(q_cls, keys, token_index):
    """PruMerge's [CLS] attention: softmax(q_cls . k / sqrt(C)) over the whole sequence with the
    full-width query and keys of one layer (no split into heads), at the visual tokens.
    q_cls [N, C], keys [N, S, C], token_index [N, P] -> [N, P] float32."""
    q, k = q_cls.astype(jnp.float32), keys.astype(jnp.float32)
    p = jax.nn.softmax(jnp.einsum("nc,nsc->ns", q, k) * q.shape[-1] ** -0.5, axis=-1)
    return jnp.take_along_axis(p, token_index, axis=1)


def top_k_in_order(scores, k: int):
    """[N, P] scores -> [N, k] int32 indices of the k highest, ascending (sequence order; ties:
    the lower index wins)."""
    _, idx = jax.lax.top_k(scores.astype(jnp.float32), k)
    return jnp.sort(idx, axis=1).astype(jnp.int32)


def _unit(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def divprune(features, k: int):
    """DivPrune's greedy max-min diverse subset of each image's tokens.

    With the cosine distance d = 1 - cos, the first pick is the token farthest from its nearest
    other token (argmax over j of min over i != j of d(i, j)), each next pick the token farthest
    from the picked set (argmax of min over picked of d); picked tokens are never picked again.
    Args:
      features: [N, P, D] (the projector's outputs); k: static count kept (<= P).
    Returns:
      [N, k] int32, ascending.
    """
    chex.assert_rank(features, 3)
    u = _unit(features)
    dist = 1.0 - jnp.einsum("npd,nqd->npq", u, u)                                     # [N, P, P]
    p = dist.shape[1]
    nearest = jnp.min(jnp.where(jnp.eye(p, dtype=bool), jnp.inf, dist), axis=1)       # [N, P]

    def one(d, first_scores):
        first = jnp.argmax(first_scores)
        picked = jnp.zeros(p, bool).at[first].set(True)

        def step(i, carry):
            out, picked, mind = carry
            s = jnp.argmax(jnp.where(picked, -jnp.inf, mind))
            return out.at[i].set(s), picked.at[s].set(True), jnp.minimum(mind, d[s])

        out = jnp.zeros(k, jnp.int32).at[0].set(first)
        out, _, _ = jax.lax.fori_loop(1, k, step, (out, picked, d[first]))
        return jnp.sort(out)

    return jax.vmap(one)(dist, nearest).astype(jnp.int32)



def visionzip(scores, metric, tokens, dominant: int, contextual: int):
    """VisionZip's dominant and contextual tokens of each image.

    Args:
      scores: [N, P] attention received (the [CLS]'s, or its substitute).
      metric: [N, P, K] the layer's keys averaged over heads.
      tokens: [N, P, E] the features kept / merged.
      dominant, contextual: static counts (contextual <= P - dominant).
    Returns:
      (tokens [N, dominant + contextual, E]: the dominant tokens in sequence order, then the
      contextual ones; local [N, dominant + contextual] int32, -1 at the contextual tokens).
    """
    chex.assert_rank([scores, metric, tokens], [2, 3, 3])
    n, p = scores.shape
    dom = top_k_in_order(scores, dominant)
    parts, local = [gather_tokens(tokens, dom)], [dom]
    if contextual:
        is_dom = jnp.zeros((n, p), bool).at[jnp.arange(n)[:, None], dom].set(True)
        rest = jnp.argsort(is_dom, axis=1, stable=True)[:, :p - dominant]         # in order
        r = p - dominant
        targets = np.arange(0, r, max(1, r // contextual))[:contextual]
        others = np.setdiff1d(np.arange(r), targets)
        t_idx, o_idx = rest[:, targets], rest[:, others]
        u = _unit(metric)
        sim = jnp.einsum("noc,ntc->not", gather_tokens(u, o_idx), gather_tokens(u, t_idx))
        assign = jax.nn.one_hot(jnp.argmax(sim, axis=-1), contextual, dtype=jnp.float32)
        counts = 1.0 + jnp.sum(assign, axis=1)                                        # [N, c]
        summed = jnp.einsum("not,noe->nte", assign, gather_tokens(tokens, o_idx).astype(jnp.float32))
        ctx = (summed + gather_tokens(tokens, t_idx).astype(jnp.float32)) / counts[..., None]
        parts.append(ctx.astype(tokens.dtype))
        local.append(jnp.full((n, contextual), -1, jnp.int32))
    return jnp.concatenate(parts, axis=1), jnp.concatenate(local, axis=1)


def prumerge_slots(p: int) -> int:
    """The most tokens of P the interquartile range rule can flag (values above Q3 of linear
    interpolation): P - 1 - floor(0.75 (P - 1))."""
    return p - 1 - (3 * (p - 1)) // 4


def prumerge(scores, keys, tokens, neighbors: int):
    """LLaVA-PruMerge on each image's tokens.

    Args:
      scores: [N, P] [CLS] attention (:func:`single_head_cls_attention`).
      keys: [N, P, C] the same layer's keys at the visual tokens.
      tokens: [N, P, E] the features kept / merged.
      neighbors: the key-nearest other tokens merged into each kept one (at most P - 1).
    Returns:
      (tokens [N, M + 1, E], local [N, M + 1] int32, valid [N, M + 1] bool) with M =
      :func:`prumerge_slots` (P): the outliers (> Q3 + 1.5 IQR of the image's scores) in
      descending score, each plus the score-weighted sum of its neighbours, then unused slots
      (valid False, local -1), then the score-weighted sum of the pruned tokens (local -1).
    """
    chex.assert_rank([scores, keys, tokens], [2, 3, 3])
    n, p = scores.shape
    m = prumerge_slots(p)
    s = scores.astype(jnp.float32)
    q1, q3 = jnp.percentile(s, 25, axis=1, keepdims=True), jnp.percentile(s, 75, axis=1, keepdims=True)
    count = jnp.sum(s > q3 + 1.5 * (q3 - q1), axis=1)
    _, order = jax.lax.top_k(s, m)
    kept = jnp.arange(m)[None] < count[:, None]                                       # [N, M]
    u = _unit(keys)
    sim = jnp.where(jnp.eye(p, dtype=bool), -jnp.inf, jnp.einsum("npc,nqc->npq", u, u))
    _, near = jax.lax.top_k(sim, min(neighbors, p - 1))                               # [N, P, k]
    x = tokens.astype(jnp.float32)
    near_x = jax.vmap(lambda t, i: t[i])(x, near)                                      # [N, P, k, E]
    near_w = jax.vmap(lambda t, i: t[i])(s, near)                                      # [N, P, k]
    merged = x + jnp.einsum("npk,npke->npe", near_w, near_x)
    pruned = ~jnp.zeros((n, p), bool).at[jnp.arange(n)[:, None], order].set(kept)
    extra = jnp.einsum("np,npe->ne", jnp.where(pruned, s, 0.0), x)[:, None]
    out = jnp.concatenate([gather_tokens(merged, order), extra], axis=1).astype(tokens.dtype)
    local = jnp.concatenate([jnp.where(kept, order, -1), jnp.full((n, 1), -1)], axis=1)
    valid = jnp.concatenate([kept, jnp.ones((n, 1), bool)], axis=1)
    return out, local.astype(jnp.int32), valid


def tower_positions(token_index, local):
    """The tower positions [N, k] int32 of the visual tokens ``local`` [N, k] (-1 kept as -1)
    index among an image's visual tokens, whose positions are ``token_index`` [N, P]."""
    at = jnp.take_along_axis(token_index, jnp.maximum(local, 0), axis=1)
    return jnp.where(local >= 0, at, -1).astype(jnp.int32)


def kept_positions(model, params, pixel_values):
    """The vision tower positions each image's reduced visual tokens come from, under
    ``model.interventions.reduce`` (an LVLM of :mod:`vitsink_jax.models`).

    Args:
      model: an LVLM whose ``interventions.reduce`` is set; params: its params;
      pixel_values: [N, C, H, W] (one image per row of the prompts it would serve).
    Returns:
      int32 [N, k] (k = the LLM's visual tokens per image, ``reduce.slots(P)``): the position in
      the tower's token sequence (as ``LlavaOutput.vision_token_index``: CLIP's [CLS] is 0, its
      patches 1..) of the ViT token each slot holds, ascending for FasterVLM / DivPrune /
      VisionZip's dominant tokens, PruMerge's in descending [CLS] attention; -1 where a slot
      holds no single ViT token (VisionZip's contextual tokens, PruMerge's appended token and
      its unused slots).
    """
    return model.apply({"params": params}, jnp.asarray(pixel_values), method=model.reduced_tokens)[1]

# the tower's layer param names: (layer, pre-attention LayerNorm, query Dense, key Dense)
_CLIP_QK = ("layers_{}", ("layer_norm1",), ("self_attn", "q_proj"), ("self_attn", "k_proj"))
_DINOV2_QK = ("layer_{}", ("norm1",), ("attention", "attention", "query"), ("attention", "attention", "key"))
QK_PARAMS = {"clip_vision_model": _CLIP_QK, "siglip_vision_model": _CLIP_QK,  # tower model_type -> params
             "dinov2": _DINOV2_QK, "dinov2_with_registers": _DINOV2_QK}


def layer_qk(tower_params: dict, kind: str, layer: int, hidden, eps: float):
    """Query and key projections [N, S, C] of the pre-LN encoder layer ``layer`` of a tower whose
    config's model_type is ``kind`` (:data:`QK_PARAMS`: CLIP / SigLIP, DINOv2) on its input ``hidden``
    [N, S, C] (``hidden_states[layer]``), computed from the tower's params as the layer does."""
    if kind not in QK_PARAMS:
        raise ValueError(f"keys of a {kind!r} vision tower are not wired for token reduction "
                         f"(towers: {', '.join(QK_PARAMS)})")
    name, ln, q, k = QK_PARAMS[kind]
    p = tower_params["encoder"][name.format(layer)]
    sub = lambda path: {"params": functools.reduce(lambda d, key: d[key], path, p)}  # noqa: E731
    x = nn.LayerNorm(epsilon=eps, dtype=hidden.dtype, parent=None).apply(sub(ln), hidden)
    dense = nn.Dense(hidden.shape[-1], dtype=hidden.dtype, parent=None)  # unbound: applied here
    return dense.apply(sub(q), x), dense.apply(sub(k), x)
