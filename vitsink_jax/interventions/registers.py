"""Test-time registers (Jiang et al., "Vision Transformers Don't Need Trained Registers", 2025)
as pure functions: finding the ViT MLP neurons that write the high-norm outliers, and moving
their activation into extra tokens. B images, N tokens (prefix + patches), F MLP neurons,
R extra register tokens (appended last, zeros after the embeddings, never passed on).
"""

from __future__ import annotations

import re
from typing import Optional

import chex
import jax.numpy as jnp
import numpy as np

from ..data.preprocess import pixels_from_bytes
from ..sinks.detect import sink_mask, token_norms


def move_to_registers(act, neurons, registers: int, prefix: int, scale: float = 1.0,
                      value: str = "sign-max"):
    """One layer's MLP activations [B, N + R, F] with each neuron of ``neurons`` [k] moved to
    the registers: the R last tokens get scale x the peak, the patches (tokens ``prefix`` ..
    N - 1) get 0; CLS / trained registers keep theirs. value: "sign-max" (the authors' code,
    shared/hook_fn.py activate_on_registers: one peak per image, the activation of largest
    magnitude, sign kept, over all tokens and the layer's k neurons, written to every one of
    them) or "per-neuron-max" (each neuron's own max over the tokens)."""
    chex.assert_rank(act, 3)
    idx = jnp.asarray(neurons, jnp.int32)
    sel = act[..., idx]                                                       # [B, N + R, k]
    if value == "sign-max":
        hi = jnp.max(sel, axis=(1, 2), keepdims=True)
        lo = jnp.min(sel, axis=(1, 2), keepdims=True)
        peak = jnp.where(jnp.abs(hi) > jnp.abs(lo), hi, lo)                   # [B, 1, 1]
    else:
        peak = jnp.max(sel, axis=1, keepdims=True)                            # [B, 1, k]
    n = act.shape[1] - registers
    token = jnp.arange(act.shape[1])[None, :, None]
    sel = jnp.where(token >= n, scale * peak, jnp.where(token >= prefix, 0.0, sel))
    return act.at[..., idx].set(sel.astype(act.dtype))


SPARSE_BELOW, SPARSE_SHARE = 0.5, 0.5  # the authors' sparsity filter (shared/algorithms.py)
SEARCH_IMAGES, SEARCH_CHUNK = 100, 8  # images the harness searches on (the authors' ~100), per forward


def image_neuron_scores(activations, outliers, sparsity_filter: bool = True):
    """Per image, each neuron's mean |activation| at its outlier tokens: (scores [L, B, F],
    has outliers [B] bool). activations, outliers, sparsity_filter: see
    :func:`find_register_neurons`."""
    signed = np.stack([np.asarray(a, np.float32) for a in activations])          # [L, B, N, F]
    out = np.asarray(outliers, bool)
    w = out[None, :, :, None].astype(np.float32)
    per_image = (np.abs(signed) * w).sum(2) / np.maximum(w.sum(2), 1)            # [L, B, F]
    if sparsity_filter:
        per_image = per_image * ((signed < SPARSE_BELOW).sum(2) >= SPARSE_SHARE * signed.shape[2])
    return per_image, out.any(axis=1)


def top_register_neurons(per_image, have, top: int, highest_layer: Optional[int] = None) -> list:
    """The ``top`` (layer, neuron, score) by the scores [L, B, F] averaged over the images with
    outliers (``have`` [B]), from layers <= ``highest_layer`` (None: all)."""
    if not have.any():
        raise ValueError("no outlier token in any image: lower the rule's threshold (or use topk)")
    score = per_image[:, have].mean(1)                                            # [L, F]
    if highest_layer is not None:
        score = score[:highest_layer + 1]
    order = np.argsort(-score, axis=None)[:top]
    return [(int(i // score.shape[1]), int(i % score.shape[1]), float(score.flat[i])) for i in order]


def find_register_neurons(activations, outliers, top: int = 10, highest_layer: Optional[int] = None,
                          sparsity_filter: bool = True) -> list:
    """The (layer, neuron, score) of the ``top`` neurons with the largest mean |activation| at
    outlier tokens, averaged over the images that have outliers (the authors' code,
    shared/algorithms.py find_register_neurons, then filter_layers).

    Args:
      activations: L x [B, N, F] MLP activations per layer (e.g. from ``mutable=["intermediates"]``).
      outliers: [B, N] bool, the outlier (sink) tokens, e.g. a sink rule on a late layer's norms.
      highest_layer: only neurons of layers <= this one (the authors: the layer where the
        outliers appear, e.g. 5 for CLIP ViT-B/16; a neuron after the layer the outliers are
        read from cannot write them); None: every layer.
      sparsity_filter: an image's neuron scores 0 unless it is sparse there: at least
        ``SPARSE_SHARE`` of the image's tokens have activation < ``SPARSE_BELOW`` (the authors'
        notebook turns it on).
    """
    return top_register_neurons(*image_neuron_scores(activations, outliers, sparsity_filter), top,
                                highest_layer)


def tower_scores(model, params, pixels, rule):
    """:func:`image_neuron_scores` of an LVLM's tower on ``pixels`` [B, C, H, W], outliers = the
    sinks of ``rule`` on the projector input."""
    from flax import traverse_util

    (selected, vout), state = model.apply({"params": params}, jnp.asarray(pixels),
                                          method=model.vision_features, mutable=["intermediates"])
    index = np.asarray(model.apply({"params": params}, selected, vout, method=model.vision_token_index))
    layers = {}
    for path, value in traverse_util.flatten_dict(state["intermediates"]).items():
        hit = [int(m.group(1)) for k in path if (m := re.fullmatch(r"layers?_(\d+)", k))]
        if hit:  # encoder layers only (not SigLIP's pooling head)
            layers[hit[0]] = value[0]
    acts = [layers[i] for i in sorted(layers)]
    c = model.config
    cls = c.sink_prefix(rule)  # a kept CLS is no outlier unless asked
    sinks = np.asarray(sink_mask(token_norms(selected), rule, cls))
    outliers = np.zeros((sinks.shape[0], c.vision.prefix_tokens + c.grid_size ** 2), bool)
    np.put_along_axis(outliers, index, sinks, axis=1)  # tower order, registers too
    return image_neuron_scores(acts, outliers)


def search_pixels(config, records: list) -> np.ndarray:
    """pixel_values [N, C, H, W] of the first ``SEARCH_IMAGES`` distinct images of benchmark
    records (their "image" bytes), the images the neuron search runs on."""
    images = list(dict.fromkeys(r["image"] for r in records))[:SEARCH_IMAGES]
    return np.stack([pixels_from_bytes(config, raw) for raw in images])


def register_neurons(model, params, pixels, rule, top: int, highest_layer: Optional[int] = None) -> list:
    """For an LVLM: the ``top`` (layer, neuron, score) register neurons of the LVLM's
    vision tower on ``pixels`` [N, C, H, W] (``SEARCH_CHUNK`` images per forward), outliers =
    the sinks of ``rule`` on the projector input (the feature layer), from layers up to
    ``highest_layer`` (None: the feature layer, the last whose neurons reach the projector)."""
    parts = [tower_scores(model, params, pixels[i:i + SEARCH_CHUNK], rule)
             for i in range(0, len(pixels), SEARCH_CHUNK)]
    per_image = np.concatenate([p for p, _ in parts], 1)
    if highest_layer is None:  # hidden_states[i] is layer i - 1's output
        highest_layer = max(f % (per_image.shape[0] + 1) for f in model.config.feature_layers) - 1
    return top_register_neurons(per_image, np.concatenate([h for _, h in parts]), top, highest_layer)
