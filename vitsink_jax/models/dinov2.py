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
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..config import VisionConfig
from . import registry
from .attention import dot_product_attention
from .layers import PatchEmbeddings
from .outputs import VisionOutput
from ..interventions import TestTimeRegisters
from .vit import VisionMLP, register_edit, with_registers, without_registers


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


class Dinov2Embeddings(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [B, C, H, W] -> [B, 1 + R + N, E] (CLS, registers, patches)."""
        c = self.config
        e, p = c.hidden_size, c.patch_size
        h, w = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)
        x = PatchEmbeddings(c, self.dtype, self.param_dtype, name="patch_embeddings")(x)
        init = nn.initializers.normal(0.02)
        cls = self.param("cls_token", init, (1, 1, e), self.param_dtype)
        self.param("mask_token", nn.initializers.zeros, (1, e), self.param_dtype)  # HF has it; unused
        pos = self.param("position_embeddings", init, (1, c.num_patches + 1, e), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, e)), x], 1)
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


class Dinov2Attention(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

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


class Dinov2Layer(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, edit=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name, **kw)  # noqa: E731
        h, weights = Dinov2Attention(c, name="attention", **kw)(ln("norm1")(x))
        x = x + LayerScale(c.layerscale_value, self.param_dtype, name="layer_scale1")(h)
        h = VisionMLP(c.hidden_size, c.intermediate_size, c.hidden_act, name="mlp", **kw)(
            ln("norm2")(x), edit)
        return x + LayerScale(c.layerscale_value, self.param_dtype, name="layer_scale2")(h), weights


class Dinov2Encoder(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    test_time_registers: Optional[TestTimeRegisters] = None

    @nn.compact
    def __call__(self, x):
        """Returns (last, hidden_states L+1 x [B, N, E], attentions L x [B, H, N, N])."""
        states, attns = [x], []
        for i in range(self.config.num_hidden_layers):
            x, w = Dinov2Layer(self.config, self.dtype, self.param_dtype, name=f"layer_{i}")(
                x, register_edit(self.test_time_registers, i, self.config))
            states.append(x)
            attns.append(w)
        return x, tuple(states), tuple(attns)


class Dinov2Tower(nn.Module):
    """``__call__(pixel_values [B, C, H, W])`` -> VisionOutput like transformers' Dinov2Model:
    hidden_states = embeddings then every layer's output; last_hidden_state after the final
    layernorm; pooler = its CLS row. H and W must be multiples of the patch size."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    test_time_registers: Optional[TestTimeRegisters] = None

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states: bool = False,
                 output_attentions: bool = False) -> VisionOutput:
        c = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1] != c.num_channels or \
                pixel_values.shape[2] % c.patch_size or pixel_values.shape[3] % c.patch_size:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                             f"[B, {c.num_channels}, H, W] with H, W multiples of {c.patch_size}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dinov2Embeddings(c, name="embeddings", **kw)(pixel_values)
        ttr = self.test_time_registers
        x, states, attns = Dinov2Encoder(c, name="encoder", test_time_registers=ttr, **kw)(
            with_registers(x, ttr))
        x, states, attns = without_registers(ttr, x, states, attns)
        last = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layernorm", **kw)(x)
        return VisionOutput(last_hidden_state=last, pooler_output=last[:, 0],
                            hidden_states=states if output_hidden_states else None,
                            attentions=attns if output_attentions else None)


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
