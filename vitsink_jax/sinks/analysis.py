"""The paper's findings as pure functions of attention maps, hidden states and sink masks.

Shapes: L LLM layers, B batch, H heads, T sequence, P visual tokens per sequence, D hidden size,
K norm buckets. ``vis_attn`` below is the attention each visual token receives, averaged over the
chosen query tokens (text / generated), per layer and head: [L, B, H, P].

* F1 :func:`attention_by_norm_bucket`, :func:`sink_attention_ratio` (paper: ~7x on LLaVA-1.5-7B).
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

from .detect import attention_received, llm_sink_mask, massive_activation_dims, sink_mask, token_norms


def visual_positions(input_ids: jnp.ndarray, image_token_index: int, num_visual: int) -> jnp.ndarray:
    """Sequence positions of the visual tokens, one image per row.

    input_ids [B, T] -> [B, P] int32 (P = num_visual, static). Rows with fewer image tokens are
    padded with T - 1; callers check counts outside jit.
    """
    t = input_ids.shape[1]
    return jax.vmap(lambda row: jnp.nonzero(row == image_token_index, size=num_visual,
                                            fill_value=t - 1)[0])(input_ids).astype(jnp.int32)


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


def attention_by_norm_bucket(vis_attn: jnp.ndarray, norms: jnp.ndarray, edges: jnp.ndarray):
    """F1: mean attention received per visual token, bucketed by its ViT norm.

    vis_attn [L, B, H, P]; norms [B, P]; edges [K + 1] increasing (a token with
    edges[k] <= norm < edges[k+1] falls in bucket k; the last bucket is closed on the right).
    Returns (mean [L, H, K] float32, NaN for empty buckets; count [K] tokens per bucket).
    """
    chex.assert_rank([vis_attn, norms, edges], [4, 2, 1])
    chex.assert_equal_shape([vis_attn[0, :, 0], norms])
    k = edges.shape[0] - 1
    bucket = jnp.clip(jnp.searchsorted(edges, norms, side="right") - 1, 0, k - 1)
    inside = (norms >= edges[0]) & (norms <= edges[-1])
    onehot = jax.nn.one_hot(bucket, k) * inside[..., None]                      # [B, P, K]
    count = jnp.sum(onehot, axis=(0, 1))                                        # [K]
    total = jnp.einsum("lbhp,bpk->lhk", vis_attn.astype(jnp.float32), onehot)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan), count


def _group_mean(vis_attn: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Mean over batch, heads and masked tokens, per layer. mask [B, P] or [L, B, P] -> [L]."""
    mask = jnp.broadcast_to(mask, (vis_attn.shape[0],) + vis_attn.shape[1:2] + vis_attn.shape[3:])
    w = mask.astype(jnp.float32)[:, :, None, :]                                  # [L, B, 1, P]
    num = jnp.sum(vis_attn.astype(jnp.float32) * w, axis=(1, 2, 3))
    den = jnp.sum(w, axis=(1, 2, 3)) * vis_attn.shape[2]
    return jnp.where(den > 0, num / jnp.maximum(den, 1.0), jnp.nan)


def sink_attention_ratio(vis_attn: jnp.ndarray, sink_mask: jnp.ndarray) -> jnp.ndarray:
    """F1 headline: mean attention per ViT-sink token / per non-sink token, per layer.

    vis_attn [L, B, H, P]; sink_mask [B, P] bool -> [L] float32 (NaN where a group is empty).
    """
    return _group_mean(vis_attn, sink_mask) / _group_mean(vis_attn, ~sink_mask)


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
                    bucket_edges: jnp.ndarray, llm_tau: float = 20.0, sink_dims=None) -> dict:
    """F1-F3 for one LVLM forward with one image per row (jit-able; ``rule`` is static).

    out: an LVLM output with ``attentions``, ``hidden_states`` and ``vision_features``
    ([B, P, E]); the query tokens are the ones after the last visual token. ``sink_dims`` [S]
    int: the LLM's sink dimensions, or None to discover them from massive activations in the
    middle layer. Returns a dict of arrays (shapes in the keys' comments).
    """
    feats = out.vision_features
    b, p = feats.shape[:2]
    norms = token_norms(feats)                                           # [B, P]
    vit_sink = sink_mask(norms, rule)                                    # [B, P]
    vis_pos = visual_positions(input_ids, image_token_index, p)          # [B, P]
    query = jnp.arange(input_ids.shape[1])[None] > vis_pos[:, -1:]       # [B, T]
    vis_attn = stack_visual_attention(out.attentions, vis_pos, query)    # [L, B, H, P]
    hidden = jnp.stack(out.hidden_states[:-1])                           # [L, B, T, D] layer inputs
    if sink_dims is None:
        sink_dims = massive_activation_dims(hidden[hidden.shape[0] // 2])
    vis_hidden = jnp.take_along_axis(hidden, vis_pos[None, :, :, None], axis=2)  # [L, B, P, D]
    llm_sink = llm_sink_mask(vis_hidden, sink_dims, llm_tau)             # [L, B, P]
    groups = token_groups(vit_sink, llm_sink)
    bucket_mean, bucket_count = attention_by_norm_bucket(vis_attn, norms, bucket_edges)
    return {
        "norms": norms, "vit_sink": vit_sink, "llm_sink": llm_sink, "sink_dims": sink_dims,
        "vis_attn": vis_attn,
        "sink_ratio": sink_attention_ratio(vis_attn, vit_sink),                      # [L]
        "bucket_mean": bucket_mean, "bucket_count": bucket_count,                    # [L,H,K], [K]
        "share": attention_share_by_group(vis_attn, groups),                         # {g: [L]}
        "dim_profile": {g: sink_dimension_profile(vis_hidden, m) for g, m in groups.items()},
    }
