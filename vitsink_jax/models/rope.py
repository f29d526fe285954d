"""Rotary position embeddings with the ``rope_type`` variants transformers uses for LLaMA / Qwen2 /
Phi: default, linear, dynamic (NTK), yarn, longrope and llama3. Rotate-half convention (HF); with
``partial_rotary_factor`` < 1 (Phi) only each head's leading ``config.rotary_dim`` dims rotate.

Frequencies follow ``transformers.modeling_rope_utils`` step by step in float32. The two
sequence-length-dependent types (dynamic, longrope) read the length from ``position_ids`` inside
the traced computation, so they stay jit-able with no recompile per length.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ..config import TextConfig

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def _yarn(rope: dict, base: float, dim: int, mpe: int):
    factor = rope.get("factor") or mpe / rope["original_max_position_embeddings"]
    orig = rope["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.get("attention_factor")
    if attn is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attn = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (np.arange(0, dim, 2).astype(np.float32) / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv.astype(np.float32), attn


def _llama3(rope: dict, inv: np.ndarray):
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, smoothed, out).astype(np.float32)


def inv_freq(config: TextConfig, position_ids):
    """Returns (inv_freq [D/2] float32, attention scaling) for ``position_ids`` [B, T] (or
    [B, T, 3])."""
    rope = config.rope
    kind = rope.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {kind!r}; supported: {ROPE_TYPES}")
    dim, base, mpe = config.rotary_dim, config.rope_theta, config.max_position_embeddings
    expo = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    plain = (1.0 / (base ** expo)).astype(np.float32)
    seq_len = jnp.max(position_ids) + 1
    if kind == "default":
        return jnp.asarray(plain), 1.0
    if kind == "linear":
        return jnp.asarray(plain / rope["factor"]), 1.0
    if kind == "llama3":
        return jnp.asarray(_llama3(rope, plain)), 1.0
    if kind == "yarn":
        inv, attn = _yarn(rope, base, dim, mpe)
        return jnp.asarray(inv), attn
    if kind == "dynamic":
        seq = jnp.maximum(seq_len, mpe).astype(jnp.float32)
        factor = rope["factor"]
        new_base = base * ((factor * seq / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (new_base ** jnp.asarray(expo)), 1.0
    # longrope: long factors once the sequence outgrows the original context
    orig = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or mpe / orig
    attn = rope.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = jnp.where(seq_len > orig, jnp.asarray(rope["long_factor"], jnp.float32),
                    jnp.asarray(rope["short_factor"], jnp.float32))
    return 1.0 / (ext * jnp.asarray(base ** expo)), attn


def mrope_axes(section: tuple) -> np.ndarray:
    """[sum(section)] int: the position axis (0 temporal, 1 height, 2 width) each rotary
    frequency reads under multimodal RoPE (transformers' Qwen2.5-VL: section i -> axis i % 3)."""
    return np.concatenate([np.full(n, i % 3, np.int32) for i, n in enumerate(section)])


def rotary_embedding(config: TextConfig, position_ids):
    """position_ids [B, T], or [B, T, 3] (temporal, height, width: multimodal RoPE, needs
    ``config.mrope_section``) -> (cos, sin) each [B, T, R] float32 (attention scaling folded in;
    R = ``config.rotary_dim``, the head dim unless the rotation is partial). Under multimodal
    RoPE each frequency turns with its section's axis; 1-D ids equal three equal axes."""
    inv, scaling = inv_freq(config, position_ids)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv
    if position_ids.ndim == 3:  # [B, T, 3, R / 2] -> each frequency's own axis
        if config.mrope_section is None:
            raise ValueError(f"position_ids {tuple(position_ids.shape)} have 3 axes per token, but "
                             f"this {config.model_type} has no mrope_section (multimodal RoPE)")
        axes = jnp.asarray(mrope_axes(config.mrope_section))
        freqs = jnp.take_along_axis(freqs, axes[None, None, None, :], axis=2)[:, :, 0]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def apply_rotary(x, cos, sin):
    """x [B, T, H, D]; cos, sin [B, T, R] -> x with its leading R dims rotated (rotate-half
    convention; the other D - R pass unchanged), x.dtype."""
    r = cos.shape[-1]
    x, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    out = x * cos + rotated * sin
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out
