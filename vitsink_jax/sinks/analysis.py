"""The paper's findings as pure functions of attention maps, hidden states and sink masks.

Shapes: L LLM layers, B batch, H heads, T sequence, P visual tokens per sequence, D hidden size,
K norm buckets. ``vis_attn`` below is the attention each visual token receives, averaged over the
chosen query tokens, per layer and head: [L, B, H, P], always in the *stock* token order (token i
= the i-th visual token the vision tower gives), whatever order the LLM saw them in (see
:func:`stock_order`: sink-to-the-front variants and DIYSink put sinks first).

* F1 :func:`attention_by_norm_bucket`, :func:`sink_attention_ratio` (paper: ~7x on LLaVA-1.5-7B,
  attention paid by the generated answer tokens).
* F2 :func:`token_groups` + :func:`attention_share_by_group` (paper: non-sink 0.15%,
  LLM-emerged sinks 1.27%, propagated ViT sinks 1.13% per token).
* F3 :func:`sink_dimension_profile` + :func:`top_dims` (which hidden dims each group fires).
* F4 :func:`relevance_maps` (ViT attention column on the patch grid) and :func:`top_decoded` on
  the logits of ``LlavaForConditionalGeneration.decode_isolated`` (logit lens of a visual token
  processed alone).
* F5 token selection is :class:`vitsink_jax.sinks.fuse.VisualTokenPolicy` (select "sinks" /
  "nonsinks"); its scores by global / local tag come from the benchmark harness (eval_lib).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from .detect import attention_received, llm_sink_mask, massive_activation_dims, sink_mask, token_norms
from .fuse import permute_tokens

QUERIES = ("answer", "after_image")


def visual_positions(input_ids: jnp.ndarray, image_token_index: int, num_visual: int) -> jnp.ndarray:
    """Sequence positions (slots) of the visual tokens, one image per row.

    input_ids [B, T] -> [B, P] int32 (P = num_visual, static). Concrete ids must hold exactly P
    image tokens per row (ValueError naming the row otherwise); under jit a row with another
    count gets position T - 1 for the missing ones and :func:`analyze_forward` turns its
    results to NaN (see :func:`visual_rows_ok`), so it can never pass as a number.
    """
    chex.assert_rank(input_ids, 2)
    if not isinstance(input_ids, jax.core.Tracer):
        counts = np.sum(np.asarray(input_ids) == image_token_index, axis=1)
        bad = np.flatnonzero(counts != num_visual)
        if bad.size:
            raise ValueError(f"input_ids row {int(bad[0])} holds {int(counts[bad[0]])} image tokens "
                             f"(id {image_token_index}); the analysis needs exactly {num_visual} "
                             "(one image) per row")
    t = input_ids.shape[1]
    return jax.vmap(lambda row: jnp.nonzero(row == image_token_index, size=num_visual,
                                            fill_value=t - 1)[0])(input_ids).astype(jnp.int32)


def visual_rows_ok(input_ids: jnp.ndarray, image_token_index: int, num_visual: int) -> jnp.ndarray:
    """input_ids [B, T] -> [B] bool: the row holds exactly ``num_visual`` image tokens."""
    return jnp.sum(input_ids == image_token_index, axis=1) == num_visual


def stock_order(x: jnp.ndarray, arrangement) -> jnp.ndarray:
    """x [B, P, ...] indexed by visual slot (the order the LLM saw, slot j holding stock token
    ``arrangement.permutation[b, j]``) -> the same values indexed by stock token. ``arrangement``
    is a model output's ``visual_arrangement`` (None for the stock order: x unchanged)."""
    if arrangement is None:
        return x
    chex.assert_equal_shape_prefix([x, arrangement.permutation], 2)
    return permute_tokens(x, jnp.argsort(arrangement.permutation, axis=-1))


def queries_after_image(vis_slots: jnp.ndarray, attention_mask: jnp.ndarray) -> jnp.ndarray:
    """The "after_image" queries: every kept token after the last visual slot.

    vis_slots [B, P] int; attention_mask [B, T] -> [B, T] bool."""
    t = attention_mask.shape[1]
    return (jnp.arange(t)[None] > jnp.max(vis_slots, axis=1, keepdims=True)) & attention_mask.astype(bool)


def answer_queries(prompt_len: jnp.ndarray, answer_len: jnp.ndarray, length: int) -> jnp.ndarray:
    """The "answer" queries (the paper's): the generated answer tokens of prompt + answer rows.

    prompt_len, answer_len [B] int; length: T (static) -> [B, T] bool, True on positions
    prompt_len <= t < prompt_len + answer_len."""
    t = jnp.arange(length)[None]
    return (t >= prompt_len[:, None]) & (t < (prompt_len + answer_len)[:, None])


def visual_attention(attn: jnp.ndarray, vis_pos: jnp.ndarray, query_mask: jnp.ndarray) -> jnp.ndarray:
    """Attention that the query tokens pay to each visual token, averaged over those queries.

    attn [B, H, T, T] (one layer); vis_pos [B, P] int; query_mask [B, T] bool (e.g. the text
    tokens after the image, or generated tokens) -> [B, H, P] float32.
    """
    chex.assert_rank([attn, vis_pos, query_mask], [4, 2, 2])
    cols = jnp.take_along_axis(attn, vis_pos[:, None, None, :], axis=-1)        # [B, H, T, P]
    return attention_received(cols, query_mask)


def stack_visual_attention(attentions, vis_pos, query_mask) -> jnp.ndarray:
    """A model's per-layer attention tuple (L x [B, H, T, T]) -> vis_attn [L, B, H, P]."""
    return jnp.stack([visual_attention(a, vis_pos, query_mask) for a in attentions])


def attention_by_norm_bucket(vis_attn: jnp.ndarray, norms: jnp.ndarray, edges: jnp.ndarray,
                             valid: jnp.ndarray | None = None):
    """F1: mean attention received per visual token, bucketed by its ViT norm.

    vis_attn [L, B, H, P]; norms [B, P]; edges [K + 1] increasing (a token with
    edges[k] <= norm < edges[k+1] falls in bucket k; the last bucket is closed on the right);
    valid [B, P] bool: the tokens that count (default all).
    Returns (mean [L, H, K] float32, NaN for empty buckets; count [K] tokens per bucket).
    """
    chex.assert_rank([vis_attn, norms, edges], [4, 2, 1])
    chex.assert_equal_shape([vis_attn[0, :, 0], norms])
    k = edges.shape[0] - 1
    bucket = jnp.clip(jnp.searchsorted(edges, norms, side="right") - 1, 0, k - 1)
    inside = (norms >= edges[0]) & (norms <= edges[-1])
    if valid is not None:
        inside = inside & valid
    onehot = jax.nn.one_hot(bucket, k) * inside[..., None]                      # [B, P, K]
    count = jnp.sum(onehot, axis=(0, 1))                                        # [K]
    total = jnp.einsum("lbhp,bpk->lhk", vis_attn.astype(jnp.float32), onehot)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan), count


def _group_mean(vis_attn: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean over batch, heads and masked tokens, per layer. mask [B, P] or [L, B, P] -> [L]."""
    mask = jnp.broadcast_to(mask, (vis_attn.shape[0],) + vis_attn.shape[1:2] + vis_attn.shape[3:])
    w = mask.astype(jnp.float32)[:, :, None, :]                                  # [L, B, 1, P]
    num = jnp.sum(jnp.where(w > 0, vis_attn.astype(jnp.float32), 0.0), axis=(1, 2, 3))  # NaN rows out
    den = jnp.sum(w, axis=(1, 2, 3)) * vis_attn.shape[2]
    return jnp.where(den > 0, num / jnp.maximum(den, 1.0), jnp.nan)


def sink_attention_ratio(vis_attn: jnp.ndarray, sink_mask: jnp.ndarray,
                         valid: jnp.ndarray | None = None) -> jnp.ndarray:
    """F1: mean attention per ViT-sink token / per non-sink token, per layer (the ratio of the
    two groups' means over batch, heads and tokens).

    vis_attn [L, B, H, P]; sink_mask, valid [B, P] bool (valid: the tokens that count, default
    all) -> [L] float32 (NaN where a group is empty).
    """
    valid = jnp.ones_like(sink_mask, bool) if valid is None else valid
    return _group_mean(vis_attn, sink_mask & valid) / _group_mean(vis_attn, ~sink_mask & valid)


def token_groups(vit_sink: jnp.ndarray, llm_sink: jnp.ndarray) -> dict:
    """F2 partition of visual tokens, per LLM layer.

    vit_sink [B, P] (ViT-norm sinks); llm_sink [L, B, P] (VAR sinks in each LLM layer's input).
    Returns {"propagated_vit_sink": ViT sinks (the paper's propagated ViT sinks; whether the LLM
    also flags them is reported by F3), "llm_emerged_sink": LLM sinks that are not ViT sinks,
    "non_sink": neither}; each [L, B, P] bool.
    """
    chex.assert_rank([vit_sink, llm_sink], [2, 3])
    vit = jnp.broadcast_to(vit_sink, llm_sink.shape)
    return {"propagated_vit_sink": vit,
            "llm_emerged_sink": llm_sink & ~vit,
            "non_sink": ~llm_sink & ~vit}


def attention_share_by_group(vis_attn: jnp.ndarray, groups: dict) -> dict:
    """F2: average attention share of one token of each group (fraction of the query's attention).

    vis_attn [L, B, H, P]; groups {name: [B, P] or [L, B, P] bool} -> {name: [L] float32}.
    """
    return {name: _group_mean(vis_attn, mask) for name, mask in groups.items()}


def sink_dimension_profile(hidden: jnp.ndarray, token_mask: jnp.ndarray) -> jnp.ndarray:
    """F3: mean |h[d]| / RMS(h) over the masked tokens, per layer and hidden dimension.

    hidden [L, B, T, D]; token_mask [B, T] or [L, B, T] bool -> [L, D] float32 (zeros where the
    mask is empty).
    """
    chex.assert_rank(hidden, 4)
    h = hidden.astype(jnp.float32)
    h = jnp.abs(h) / jnp.sqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-12)
    w = jnp.broadcast_to(token_mask, hidden.shape[:3]).astype(jnp.float32)[..., None]
    return jnp.sum(h * w, axis=(1, 2)) / jnp.maximum(jnp.sum(w, axis=(1, 2)), 1.0)


def top_dims(profile: jnp.ndarray, k: int = 3) -> jnp.ndarray:
    """profile [L, D] -> [L, k] int32, the k most activated dimensions per layer."""
    return jax.lax.top_k(profile, k)[1].astype(jnp.int32)


def relevance_maps(vit_attn: jnp.ndarray, targets: jnp.ndarray, grid: int,
                   prefix: int = 1) -> jnp.ndarray:
    """F4 relevance maps: where on the image each target ViT token is looked at from.

    The map of target j is column j of the ViT attention (the attention j receives from every
    patch query), reshaped to the patch grid, with j's attention to itself set to 0 so that only
    the other tokens count. Non-sink tokens light up their neighbourhood; sinks light up large
    foreground or background regions (paper Fig. 4).

    Args:
      vit_attn: [B, H, N, N] float attention weights of one ViT layer, N = prefix + grid**2.
      targets: [B, K] int ViT token indices (prefix tokens such as CLS included in the count).
      grid: patches per side; prefix: tokens before the patches (CLIP: 1 CLS, SigLIP: 0).
    Returns:
      [B, H, K, grid, grid] float32.
    """
    chex.assert_rank([vit_attn, targets], [4, 2])
    b, h, n, _ = vit_attn.shape
    if n != prefix + grid * grid:
        raise ValueError(f"ViT attention over {n} tokens does not match prefix {prefix} + "
                         f"grid {grid}x{grid}")
    cols = jnp.take_along_axis(vit_attn[:, :, prefix:, :].astype(jnp.float32),
                               targets[:, None, None, :], axis=3)               # [B, H, P, K]
    own = jnp.arange(prefix, n)[None, None, :, None] == targets[:, None, None, :]
    cols = jnp.where(own, 0.0, cols)
    return jnp.moveaxis(cols, 3, 2).reshape(b, h, targets.shape[1], grid, grid)


def relevance_targets(norms: jnp.ndarray) -> jnp.ndarray:
    """The tokens whose relevance maps the reports show: the two largest norms and the median
    norm. norms [B, P] -> [B, 3] int token indices."""
    order = jnp.argsort(-norms, axis=-1)
    mid = order.shape[1] // 2
    return jnp.concatenate([order[:, :2], order[:, mid:mid + 1]], axis=-1)


def vit_attention_layer(feature_layer: int) -> int:
    """Index into the ViT ``attentions`` tuple of the layer that produced hidden state
    ``feature_layer`` (hidden states start with the embeddings; negative indices count back)."""
    return feature_layer if feature_layer < 0 else feature_layer - 1


def top_decoded(logits: jnp.ndarray, k: int = 5):
    """F4 logit-lens readout: logits [..., V] -> (top-k ids [..., k] int32, probs [..., k])."""
    probs, ids = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)
    return ids.astype(jnp.int32), probs


def analyze_forward(out, input_ids: jnp.ndarray, image_token_index: int, rule,
                    bucket_edges: jnp.ndarray, query_mask: jnp.ndarray,
                    attention_mask: jnp.ndarray | None = None, llm_tau: float = 20.0,
                    sink_dims=None, prefix: int = 0) -> dict:
    """F1-F3 for one LVLM forward with one image per row (jit-able; ``rule``, ``prefix`` static).

    out: an LVLM output with ``attentions``, ``hidden_states``, ``vision_features`` ([B, P, E])
    and ``visual_arrangement`` (``output_vision=True``); a rearranged visual sequence
    (sink-to-the-front, a DIYSink model) is read back into stock token order, and tokens the
    arrangement dropped count in no group. query_mask [B, T] bool: the queries whose attention
    is averaged (:func:`answer_queries` for the paper's generated tokens, or
    :func:`queries_after_image`); attention_mask [B, T]: padding, never a query nor counted in
    the sink-dimension search. ``sink_dims`` [S] int: the LLM's sink dimensions, or None to
    discover them from massive activations of the text tokens in the middle layer. ``prefix``: leading visual
    tokens (a kept CLS) in neither group. A row without exactly P image tokens, or without a
    query (an empty answer), gives NaN attention and no token to any group or bucket.
    Returns a dict of arrays (shapes in the comments), every per-token array in stock order.
    """
    feats = out.vision_features
    b, p = feats.shape[:2]
    if b != input_ids.shape[0]:
        raise ValueError(f"the analysis needs one image per row; got {b} images for "
                         f"{input_ids.shape[0]} rows")
    mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    chex.assert_equal_shape([input_ids, query_mask, mask])
    arrangement = out.visual_arrangement
    norms = token_norms(feats)                                           # [B, P]
    vit_sink = sink_mask(norms, rule, prefix)                            # [B, P]
    vis_pos = stock_order(visual_positions(input_ids, image_token_index, p), arrangement)
    valid = jnp.broadcast_to(jnp.arange(p) >= prefix, (b, p))
    if arrangement is not None:
        valid = valid & stock_order(arrangement.kept, arrangement)       # [B, P]
    queries = jnp.sum(query_mask & mask, axis=1)                         # [B]
    # a row without its image tokens, or without a query (an empty answer), gives no attention
    ok = visual_rows_ok(input_ids, image_token_index, p) & (queries > 0)   # [B]
    valid = valid & ok[:, None]
    vis_attn = stack_visual_attention(out.attentions, vis_pos, query_mask & mask)  # [L, B, H, P]
    vis_attn = jnp.where(ok[None, :, None, None], vis_attn, jnp.nan)
    hidden = jnp.stack(out.hidden_states[:-1])                           # [L, B, T, D] layer inputs
    if sink_dims is None:  # from the text tokens (BOS, the first tokens): a visual token lit by
        # a ViT sink must not make its dimension an LLM sink dimension
        text = mask & (input_ids != image_token_index)
        sink_dims = massive_activation_dims(hidden[hidden.shape[0] // 2], text)
    vis_hidden = jnp.take_along_axis(hidden, vis_pos[None, :, :, None], axis=2)  # [L, B, P, D]
    llm_sink = llm_sink_mask(vis_hidden, sink_dims, llm_tau)             # [L, B, P]
    groups = {g: m & valid for g, m in token_groups(vit_sink, llm_sink).items()}
    bucket_mean, bucket_count = attention_by_norm_bucket(jnp.where(ok[None, :, None, None], vis_attn, 0.0),
                                                         norms, bucket_edges, valid)
    return {
        "norms": norms, "vit_sink": vit_sink, "llm_sink": llm_sink & valid, "sink_dims": sink_dims,
        "vis_attn": vis_attn, "valid": valid, "queries": queries,
        "sink_ratio": sink_attention_ratio(vis_attn, vit_sink, valid),               # [L]
        "group_attention": {"sink": _group_mean(vis_attn, vit_sink & valid),         # {g: [L]}
                            "non_sink": _group_mean(vis_attn, ~vit_sink & valid)},
        "bucket_mean": bucket_mean, "bucket_count": bucket_count,                    # [L,H,K], [K]
        "share": attention_share_by_group(vis_attn, groups),                         # {g: [L]}
        "dim_profile": {g: sink_dimension_profile(vis_hidden, m) for g, m in groups.items()},
    }
