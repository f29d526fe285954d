"""Small shared layers: activations (named as in transformers' ACT2FN), RMSNorm, the LLMs'
gated MLP and the vision towers' patch embedding."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import linen as nn

from ..config import VisionConfig


def quick_gelu(x):
    """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: statistics in float32, weight applied after casting back (as transformers).
    ``offset`` (Gemma's): the scale is 1 + weight (weight initialised to 0), applied in float32
    before the cast."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    offset: bool = False

    @nn.compact
    def __call__(self, x):  # [..., D] -> [..., D]
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        weight = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)
        return weight.astype(self.dtype) * x32.astype(self.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) of a TextConfig (LLaMA, Qwen2, Phi-3, Gemma 3) or Qwen2.5-VL's
    vision config (anything with hidden_size, intermediate_size, hidden_act, mlp_bias)."""

    config: object  # a TextConfig or Qwen2_5_VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        c = self.config
        dense = partial(nn.Dense, use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = activation(c.hidden_act)(dense(c.intermediate_size, name="gate_proj")(x))
        h = h * dense(c.intermediate_size, name="up_proj")(x)
        return dense(c.hidden_size, name="down_proj")(h)


class PatchEmbeddings(nn.Module):
    """``patch_embeddings.projection``: a strided conv with bias. [B, H, W, C] -> [B, N, E]."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = nn.Conv(c.hidden_size, (c.patch_size,) * 2, strides=c.patch_size, padding="VALID",
                    dtype=self.dtype, param_dtype=self.param_dtype, name="projection")(x)
        return x.reshape(x.shape[0], -1, c.hidden_size)
