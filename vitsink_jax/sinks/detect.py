"""Sink detection: pure, jit- and vmap-able functions of arrays (no side effects, shapes checked).

Paper definition (Sec. 2, Eq. 1): token j is a sink at layer l iff phi(x_j^{l-1}) >= tau, with
three choices of phi, all here:

* ViT sinks: phi = L2 norm of the visual features fed to the projector
  (:func:`token_norms`, then :func:`sink_mask` with rule ``"threshold"`` / ``"topk"`` /
  ``"adaptive"``).
* LLM sinks (VAR, "See What You Are Told"): phi = max over the sink dimensions d of
  ``|h[d]| / RMS(h)`` (:func:`sink_dim_scores`, :func:`llm_sink_mask`, tau = 20), with the sink
  dimensions found automatically from massive activations (:func:`massive_activation_dims`,
  Sun et al.: ``|a| > 100`` and ``|a| > 1000 x median |h|``).
* Mean attention received by a token (:func:`attention_received`).

Every mask has a fixed shape ([B, N] bool), so images with different sink counts batch together
and nothing recompiles per count.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp

RULES = ("threshold", "topk", "adaptive")


@dataclasses.dataclass(frozen=True)
class SinkRule:
    """How ViT sinks are picked from token norms.

    rule: "threshold" (norm >= tau; the paper's rule, tau = 100 for LLaVA-1.5's CLIP-L/336),
      "topk" (the k largest norms per image), or "adaptive" (see :func:`sink_mask_adaptive`).
    max_fraction: adaptive only; the largest share of tokens that may be sinks (the paper reports
      3-5 of 576 tokens, about 1%; 0.1 leaves ample room).
    min_ratio: adaptive only; the smallest norm ratio across the cut for sinks to exist at all.
    include_cls: whether a CLS token kept in the visual features (LLaVA's
      ``vision_feature_select_strategy="full"``) may be a sink and be moved. Default False: the
      paper's sinks are patch tokens, so CLS is left out of detection (and of the rule's
      statistics: top-k, adaptive cut) and keeps its slot, as under the "default" strategy,
      which drops it.
    """

    rule: str = "threshold"
    tau: float = 100.0
    k: int = 4
    max_fraction: float = 0.1
    min_ratio: float = 2.0
    include_cls: bool = False

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown sink rule {self.rule!r}; choose one of {RULES}")
        if self.k < 0 or not 0 < self.max_fraction <= 1 or self.min_ratio < 1:
            raise ValueError(f"bad sink rule parameters: k={self.k} (>= 0), max_fraction="
                             f"{self.max_fraction} (in (0, 1]), min_ratio={self.min_ratio} (>= 1)")


def token_norms(features: jnp.ndarray) -> jnp.ndarray:
    """L2 norm of each token. features [..., N, E] -> [..., N] float32."""
    chex.assert_rank(features, {2, 3})
    return jnp.linalg.norm(features.astype(jnp.float32), axis=-1)


def sink_mask_threshold(norms: jnp.ndarray, tau: float = 100.0) -> jnp.ndarray:
    """norms [..., N] -> bool [..., N]: norm >= tau."""
    return norms >= tau


def sink_mask_topk(norms: jnp.ndarray, k: int) -> jnp.ndarray:
    """norms [..., N] -> bool [..., N]: the k largest norms (ties broken by position). k static."""
    n = norms.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"top-k sinks: k={k} outside [0, {n}] for norms of shape {norms.shape}")
    if k == 0:
        return jnp.zeros(norms.shape, bool)
    _, idx = jax.lax.top_k(norms, k)
    return jnp.sum(jax.nn.one_hot(idx, n, dtype=jnp.int32), axis=-2) > 0


def sink_mask_adaptive(norms: jnp.ndarray, max_fraction: float = 0.1,
                       min_ratio: float = 2.0) -> jnp.ndarray:
    """Adaptive "norm-drop" rule: cut the sorted norms at their largest relative drop.

    ViT sink norms are bimodal (a handful of tokens several times larger than the rest), so with
    norms sorted descending s_0 >= s_1 >= ..., the cut goes after position i* = argmax_i
    s_i / s_{i+1}, searched over the first ``ceil(max_fraction * N)`` positions only (a sink
    mode is small; a drop deep in the tail is not one). If the largest drop is below
    ``min_ratio`` the norms are unimodal and no token is a sink (e.g. a ViT trained with
    registers). No hand-tuned tau per encoder is needed. norms [..., N] -> bool [..., N].
    """
    n = norms.shape[-1]
    if n < 2:
        raise ValueError(f"adaptive sink rule needs at least 2 tokens, got norms of shape {norms.shape}")
    m = max(1, min(n - 1, math.ceil(max_fraction * n)))
    s = -jnp.sort(-norms, axis=-1)                                   # descending
    ratios = s[..., :m] / jnp.maximum(s[..., 1:m + 1], 1e-12)        # [..., m]
    cut = jnp.argmax(ratios, axis=-1)                                # [...]
    threshold = jnp.take_along_axis(s, cut[..., None], axis=-1)      # [..., 1]
    has_sinks = jnp.max(ratios, axis=-1, keepdims=True) >= min_ratio
    return (norms >= threshold) & has_sinks


def sink_mask(norms: jnp.ndarray, rule: SinkRule = SinkRule(), prefix: int = 0) -> jnp.ndarray:
    """ViT-sink mask from token norms with the chosen rule. norms [B, N] -> bool [B, N].

    prefix (static): leading non-patch tokens (a kept CLS) that are never sinks; the rule sees
    only the N - prefix patch norms (so a large CLS norm takes no top-k place and moves no cut).
    """
    chex.assert_rank(norms, 2)
    if not 0 <= prefix < norms.shape[1]:
        raise ValueError(f"sink_mask: prefix {prefix} outside [0, {norms.shape[1]}) for norms "
                         f"of shape {norms.shape}")
    patches = norms[:, prefix:]
    if rule.rule == "threshold":
        mask = sink_mask_threshold(patches, rule.tau)
    elif rule.rule == "topk":
        mask = sink_mask_topk(patches, rule.k)
    else:
        mask = sink_mask_adaptive(patches, rule.max_fraction, rule.min_ratio)
    return jnp.pad(mask, ((0, 0), (prefix, 0)))


# --------------------------------------------------------------------------------- LLM side

def sink_dim_scores(hidden: jnp.ndarray, dims: jnp.ndarray) -> jnp.ndarray:
    """VAR's phi: max over sink dims d of |h[d]| / RMS(h).

    hidden [..., D]; dims [S] int (entries < 0 are padding and ignored, so a fixed-size list from
    :func:`massive_activation_dims` can be passed as is) -> [...] float32.
    Note phi <= sqrt(D): VAR's tau = 20 suits D = 4096 (LLaVA-7B); scale tau for small models.
    """
    chex.assert_rank(dims, 1)
    h = hidden.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-12)
    vals = jnp.abs(jnp.take(h / rms, jnp.maximum(dims, 0), axis=-1))  # [..., S]
    return jnp.max(jnp.where(dims >= 0, vals, 0.0), axis=-1)


def llm_sink_mask(hidden: jnp.ndarray, dims: jnp.ndarray, tau: float = 20.0) -> jnp.ndarray:
    """hidden [..., T, D] -> bool [..., T]: tokens whose sink-dimension score is >= tau."""
    return sink_dim_scores(hidden, dims) >= tau


def massive_activations(hidden: jnp.ndarray, abs_threshold: float = 100.0,
                        median_ratio: float = 1000.0) -> jnp.ndarray:
    """Massive activations (Sun et al. 2024): |a| > abs_threshold and |a| > median_ratio x the
    median |activation| of the same token's hidden state. hidden [..., T, D] -> bool [..., T, D]."""
    a = jnp.abs(hidden.astype(jnp.float32))
    med = jnp.median(a, axis=-1, keepdims=True)
    return (a > abs_threshold) & (a > median_ratio * med)


def massive_activation_dims(hidden: jnp.ndarray, token_mask: jnp.ndarray | None = None,
                            max_dims: int = 8, abs_threshold: float = 100.0,
                            median_ratio: float = 1000.0) -> jnp.ndarray:
    """Sink dimensions of an LLM found automatically from its massive activations.

    hidden [B, T, D] (one layer's hidden states, e.g. a middle layer); token_mask [B, T] bool
    (padding excluded). Returns [max_dims] int32: the dimensions holding massive activations,
    ordered by how many tokens fire them (then by magnitude), padded with -1.
    """
    chex.assert_rank(hidden, 3)
    massive = massive_activations(hidden, abs_threshold, median_ratio)
    if token_mask is not None:
        chex.assert_shape(token_mask, hidden.shape[:2])
        massive = massive & token_mask[..., None]
    counts = jnp.sum(massive, axis=(0, 1))                                  # [D]
    peak = jnp.max(jnp.where(massive, jnp.abs(hidden), 0.0), axis=(0, 1))   # [D]
    score = counts.astype(jnp.float32) * 1e6 + peak / (1.0 + jnp.max(peak))
    k = min(max_dims, hidden.shape[-1])
    top_score, top = jax.lax.top_k(score, k)
    return jnp.where(top_score > 0, top, -1).astype(jnp.int32)


def attention_received(attn: jnp.ndarray, query_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Mean attention each key receives over the (valid) queries: the paper's third phi.

    attn [B, H, T, S] (rows sum to 1); query_mask [B, T] bool -> [B, H, S] float32.
    """
    chex.assert_rank(attn, 4)
    a = attn.astype(jnp.float32)
    if query_mask is None:
        return jnp.mean(a, axis=2)
    chex.assert_shape(query_mask, (attn.shape[0], attn.shape[2]))
    w = query_mask.astype(jnp.float32)[:, None, :, None]
    return jnp.sum(a * w, axis=2) / jnp.maximum(jnp.sum(w, axis=2), 1.0)
