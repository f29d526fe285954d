"""DINOv2 and DINOv2-with-registers vision towers, numerically equal to transformers'
Dinov2Model / Dinov2WithRegistersModel: LayerScale, a patch embedding with bias, no
pre-layernorm, exact GELU, and position embeddings interpolated to other image sizes with
PyTorch's bicubic resampling (plain: ``align_corners=False``; registers: antialiased).

Register tokens ("Vision Transformers Need Registers") sit between CLS and the patches inside the
tower; :class:`~vitsink_jax.models.lvlm.LlavaForConditionalGeneration` never passes them to the
projector. Param names mirror HF (``embeddings.cls_token``, ``encoder.layer_N.attention.
attention.query``, ``layer_scale1.lambda1``, ``layernorm``), so conversion needs no table.
"""

from __future__ import annotations

from functools import lru_cache

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..config import VisionConfig
from . import registry
from .attention import dot_product_attention
from .layers import ConfigModule, PatchEmbeddings, PreNormBlock, prepend_token
from .outputs import VisionOutput
from .tower import VisionTower, encode, tower_output, with_registers


def _cubic(x, a):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@lru_cache(maxsize=None)
def resize_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """[n_out, n_in] weights of PyTorch's 1-D bicubic resampling (align_corners=False):
    ``antialias=False`` is ``F.interpolate(mode="bicubic")`` (a = -0.75, clamped borders);
    ``antialias=True`` its antialiased variant (a = -0.5, support widened when downsampling,
    weights normalised)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        if not antialias:
            src = (i + 0.5) * scale - 0.5
            base = int(np.floor(src))
            t = src - base
            for k, coef in zip(range(-1, 3), _cubic(np.array([1 + t, t, 1 - t, 2 - t]), -0.75)):
                w[i, min(max(base + k, 0), n_in - 1)] += coef
        else:
            support = 2.0 * max(scale, 1.0)
            center = scale * (i + 0.5)
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
            inv = 1.0 / max(scale, 1.0)
            coef = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
            w[i, lo:hi] = coef / coef.sum()
    return w.astype(np.float32)


class Dinov2Embeddings(ConfigModule):
    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [B, C, H, W] -> [B, 1 + R + N, E] (CLS, registers, patches)."""
        c = self.config
        e, p = c.hidden_size, c.patch_size
        h, w = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        x = PatchEmbeddings(c, self.dtype, self.param_dtype, name="patch_embeddings")(pixel_values)
        init = nn.initializers.normal(0.02)
        cls = self.param("cls_token", init, (1, 1, e), self.param_dtype)
        self.param("mask_token", nn.initializers.zeros, (1, e), self.param_dtype)  # HF has it; unused
        pos = self.param("position_embeddings", init, (1, c.num_patches + 1, e), self.param_dtype)
        x = prepend_token(cls, x)
        square = pixel_values.shape[2] == pixel_values.shape[3]
        x = x + self.interpolated(pos, h, w, square).astype(self.dtype)
        if c.num_register_tokens:
            reg = self.param("register_tokens", init, (1, c.num_register_tokens, e), self.param_dtype)
            reg = jnp.broadcast_to(reg.astype(self.dtype), (x.shape[0],) + reg.shape[1:])
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], 1)
        return x

    def interpolated(self, pos, h: int, w: int, square: bool):
        """Position embeddings [1, 1 + g*g, E] -> [1, 1 + h*w, E] (as transformers does it)."""
        g = self.config.grid_size
        if h * w == g * g and square:
            return pos
        antialias = self.config.num_register_tokens > 0
        grid = pos[0, 1:].astype(jnp.float32).reshape(g, g, -1)
        grid = jnp.einsum("hi,wj,ijd->hwd", resize_matrix(g, h, antialias),
                          resize_matrix(g, w, antialias), grid)
        return jnp.concatenate([pos[:, :1].astype(jnp.float32), grid.reshape(1, h * w, -1)], 1)


class _Linears(nn.Module):
    """A namespace of equal-width linear layers (HF's ``attention.attention`` q/k/v and
    ``attention.output.dense``)."""

    names: tuple
    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return [nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=n)(x) for n in self.names]


class Dinov2Attention(ConfigModule):
    @nn.compact
    def __call__(self, x):
        """[B, T, E] -> ([B, T, E], weights [B, H, T, T])."""
        c = self.config
        b, t, e = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda y: y.reshape(b, t, c.num_attention_heads, -1)  # noqa: E731
        q, k, v = _Linears(("query", "key", "value"), e, c.qkv_bias, name="attention", **kw)(x)
        out, weights = dot_product_attention(split(q), split(k), split(v))
        (out,) = _Linears(("dense",), e, name="output", **kw)(out.reshape(b, t, e))
        return out, weights


class LayerScale(nn.Module):
    """x * lambda1 (per channel)."""

    value: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        lam = self.param("lambda1", nn.initializers.constant(self.value), (x.shape[-1],),
                         self.param_dtype)
        return x * lam.astype(x.dtype)


class Dinov2Layer(PreNormBlock):
    """x + layer_scale1(attn(norm1(x))); x + layer_scale2(mlp(norm2(x)))."""

    norm_names = ("norm1", "norm2")

    def attend(self, x, output_attentions):
        return Dinov2Attention(self.config, name="attention", **self.kw)(x)

    def scaled(self, h, which):
        return LayerScale(self.config.layerscale_value, self.param_dtype, name=f"layer_scale{which + 1}")(h)


class Dinov2Tower(VisionTower):
    """``__call__(pixel_values [B, C, H, W])`` -> VisionOutput like transformers' Dinov2Model:
    hidden_states = embeddings then every layer's output; last_hidden_state after the final
    layernorm; pooler = its CLS row. H and W must be multiples of the patch size."""

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states: bool = False,
                 output_attentions: bool = False) -> VisionOutput:
        c = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != c.num_channels or \
                pixel_values.shape[2] % c.patch_size or pixel_values.shape[3] % c.patch_size:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                             f"[B, {c.num_channels}, H, W] with H, W multiples of {c.patch_size}")
        x = Dinov2Embeddings(c, name="embeddings", **self.kw)(pixel_values)
        ttr = self.test_time_registers
        x, states, attns = encode(with_registers(x, ttr), c, ttr, output_attentions, layer=Dinov2Layer,
                                  layer_name="layer", **self.kw)
        last = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layernorm", **self.kw)(x)
        return tower_output(last, last[:, 0], states, attns, output_hidden_states, output_attentions)


def _dinov2_fields(c) -> dict:
    """DINOv2's own keys: the MLP width as ``mlp_ratio``, LayerScale, registers, q/k/v bias."""
    if getattr(c, "use_swiglu_ffn", False):
        raise ValueError(f"{c.model_type} with use_swiglu_ffn=True (the giant DINOv2) is not supported")
    return dict(intermediate_size=int(c.hidden_size * c.mlp_ratio), layerscale_value=float(c.layerscale_value),
                num_register_tokens=int(getattr(c, "num_register_tokens", 0)), qkv_bias=bool(c.qkv_bias))


def _write_dinov2(config: VisionConfig, d: dict) -> None:
    del d["intermediate_size"]
    ratio = config.intermediate_size / config.hidden_size
    d.update(mlp_ratio=int(ratio) if ratio.is_integer() else ratio,
             layerscale_value=config.layerscale_value, qkv_bias=config.qkv_bias)
    if config.num_register_tokens:
        d["num_register_tokens"] = config.num_register_tokens


registry.register_tower(("dinov2", "dinov2_with_registers"), Dinov2Tower, fields=_dinov2_fields,
                        write=_write_dinov2)
