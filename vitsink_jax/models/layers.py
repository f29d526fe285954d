"""Small shared layers: activations (named as in transformers' ACT2FN), RMSNorm, the LLMs'
gated MLP, and the vision towers' parts: the patch embedding, the class token, the fc1 / fc2
MLP and the pre-norm block every tower's block is."""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn



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


class ConfigModule(nn.Module):
    """A module of one config (a tower's VisionConfig, an LLM's TextConfig) at ``dtype`` with
    params in ``param_dtype``: the fields the towers' parts share."""

    config: object
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def kw(self) -> dict:
        """dtype and param_dtype, for the submodules."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


def patch_conv(pixel_values, config, name: str, use_bias: bool = True, dtype=jnp.float32,
               param_dtype=jnp.float32):
    """pixel_values [B, C, H, W] (HF's NCHW) -> patch tokens [B, N, E] (row-major): a strided
    conv ``name`` of the calling module (config: patch_size, hidden_size)."""
    x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(dtype)
    x = nn.Conv(config.hidden_size, (config.patch_size,) * 2, strides=config.patch_size, padding="VALID",
                use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)(x)
    return x.reshape(x.shape[0], -1, config.hidden_size)


class PatchEmbeddings(ConfigModule):
    """``patch_embeddings.projection`` (DINOv2, InternViT): a strided conv with bias.
    [B, C, H, W] -> [B, N, E]."""

    @nn.compact
    def __call__(self, pixel_values):
        return patch_conv(pixel_values, self.config, "projection", dtype=self.dtype, param_dtype=self.param_dtype)


def prepend_token(token, x):
    """A learned token ([E] or [1, 1, E]) before the tokens x [B, N, E] -> [B, 1 + N, E]."""
    return jnp.concatenate([jnp.broadcast_to(token.astype(x.dtype), (x.shape[0], 1, x.shape[-1])), x], 1)


class VisionMLP(nn.Module):
    """fc2(act(fc1(x))) of the towers (CLIP, SigLIP, DINOv2, InternViT)."""

    hidden_size: int
    intermediate_size: int
    act: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, edit=None):
        """``edit``: optional fn on the activations [B, N, F] (test-time registers). The
        activations are sown as ``intermediates/mlp_activations`` (apply with
        ``mutable=["intermediates"]`` to read them)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = activation(self.act)(nn.Dense(self.intermediate_size, name="fc1", **kw)(x))
        if edit is not None:
            x = edit(x)
        self.sow("intermediates", "mlp_activations", x)
        return nn.Dense(self.hidden_size, name="fc2", **kw)(x)


class PreNormBlock(ConfigModule):
    """The towers' pre-norm block: ``x + scaled(attn(norm1(x)))``, then
    ``x + scaled(mlp(norm2(x)))``. A tower's block names its norms (``norm_names``, HF's) and
    supplies ``attend``; ``norm`` (LayerNorm), ``mlp`` (:class:`VisionMLP` named "mlp") and
    ``scaled`` (LayerScale; none here) are overridden where the tower differs.
    ``__call__(x [B, N, E], output_attentions, edit, **attend_kw)`` -> ([B, N, E], weights)."""

    norm_names: ClassVar[tuple] = ("layer_norm1", "layer_norm2")

    def norm(self, name: str) -> nn.Module:
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, name=name, **self.kw)

    def attend(self, x, output_attentions: bool, **attend_kw) -> tuple:
        """x [B, N, E] normed -> (h [B, N, E], weights [B, H, N, N] or None)."""
        raise NotImplementedError

    def mlp(self, x, edit):
        c = self.config
        return VisionMLP(c.hidden_size, c.intermediate_size, c.hidden_act, name="mlp", **self.kw)(x, edit)

    def scaled(self, h, which: int):
        """The attention (``which`` 0) or MLP (1) output before the residual."""
        return h

    @nn.compact
    def __call__(self, x, output_attentions=False, edit=None, **attend_kw):
        h, weights = self.attend(self.norm(self.norm_names[0])(x), output_attentions, **attend_kw)
        x = x + self.scaled(h, 0)
        return x + self.scaled(self.mlp(self.norm(self.norm_names[1])(x), edit), 1), weights
