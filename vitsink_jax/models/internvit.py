"""InternViT, InternVL's vision tower, numerically equal to transformers' InternVLVisionModel.

A CLS token and absolute position embeddings, then pre-norm blocks (LayerNorm or RMSNorm,
``config.norm_type``) whose attention output and MLP output are each scaled by a learned
per-channel LayerScale (``lambda_1``, ``lambda_2``) before the residual; the attention may
RMS-normalise the whole q and k (``config.qk_norm``) and projects out with
``projection_layer``. Parameter names mirror HF (``embeddings.cls_token``,
``encoder.layer_N.attention.q_proj``, ...). Test-time registers work as in the CLIP tower.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import linen as nn

from ..config import VisionConfig
from ..interventions import TestTimeRegisters
from . import registry
from .attention import Attention
from .layers import PatchEmbeddings, RMSNorm
from .outputs import VisionOutput
from .vit import Encoder, VisionMLP, check_pixels, with_registers, without_registers


def _norm(c: VisionConfig, name: str, kw: dict) -> nn.Module:
    if c.norm_type == "rms_norm":
        return RMSNorm(c.layer_norm_eps, name=name, **kw)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name=name, **kw)


class InternVisionLayer(nn.Module):
    """x + lambda_1 * attn(norm(x)); then + lambda_2 * mlp(norm(x))."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_attentions=False, edit=None):  # [B, N, E] -> ([B, N, E], weights)
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        scale = lambda name: self.param(name, nn.initializers.constant(c.layerscale_value),  # noqa: E731
                                        (c.hidden_size,), self.param_dtype).astype(self.dtype)
        h, weights, _ = Attention(c.num_attention_heads, c.num_attention_heads,
                                  c.hidden_size // c.num_attention_heads, qkv_bias=c.qkv_bias,
                                  out_name="projection_layer", qk_norm="rmsnorm" if c.qk_norm else None,
                                  qk_norm_eps=1e-6, name="attention", **kw)(
            _norm(c, "layernorm_before", kw)(x), output_attentions=output_attentions)
        x = x + scale("lambda_1") * h
        h = VisionMLP(c.hidden_size, c.intermediate_size, c.hidden_act, name="mlp", **kw)(
            _norm(c, "layernorm_after", kw)(x), edit)
        return x + scale("lambda_2") * h, weights


class InternVisionEmbeddings(nn.Module):
    """CLS token, patch embeddings and absolute positions: [B, C, H, W] -> [B, 1 + N, E]."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        init = nn.initializers.normal(0.02)
        x = PatchEmbeddings(c, self.dtype, self.param_dtype, name="patch_embeddings")(
            jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype))
        cls = self.param("cls_token", init, (1, 1, c.hidden_size), self.param_dtype)
        pos = self.param("position_embeddings", init, (1, c.num_positions, c.hidden_size), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, c.hidden_size)), x], 1)
        return x + pos.astype(self.dtype)


class InternVisionTower(nn.Module):
    """``__call__(pixel_values [B, C, H, W])`` -> VisionOutput: ``hidden_states`` = the
    embeddings then every layer's output; ``last_hidden_state`` = the last one, LayerNormed
    unless ``config.mean_pooling``; ``pooler_output`` = the mean of the patch tokens (mean
    pooling) or the CLS token. H and W must equal ``config.image_size`` (InternVL feeds tiles of
    that size)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    test_time_registers: Optional[TestTimeRegisters] = None

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states: bool = False,
                 output_attentions: bool = False) -> VisionOutput:
        c = self.config
        check_pixels(c, pixel_values)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ttr = self.test_time_registers
        x = InternVisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
        last, states, attns = Encoder(c, name="encoder", test_time_registers=ttr, layer=InternVisionLayer,
                                      layer_name="layer", **kw)(with_registers(x, ttr), output_attentions)
        last, states, attns = without_registers(ttr, last, states, attns)
        if not c.mean_pooling:
            last = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layernorm", **kw)(last)
        pooled = last[:, 1:].mean(1) if c.mean_pooling else last[:, 0]
        return VisionOutput(last_hidden_state=last, pooler_output=pooled,
                            hidden_states=states if output_hidden_states else None,
                            attentions=attns if output_attentions else None)


def _internvit_fields(c) -> dict:
    """InternViT's own keys ([h, w] image and patch sizes, square only; LayerScale, q/k norm,
    norm type, mean pooling)."""
    side = lambda v: v if isinstance(v, int) else int(v[0])  # noqa: E731
    if side(c.image_size) != c.image_size[-1] or side(c.patch_size) != c.patch_size[-1]:
        raise ValueError(f"internvl_vision image_size {c.image_size} / patch_size {c.patch_size}: "
                         "only square images and patches are supported")
    if not c.use_absolute_position_embeddings:
        raise ValueError("internvl_vision without absolute position embeddings is not supported")
    return dict(image_size=side(c.image_size), patch_size=side(c.patch_size),
                layerscale_value=float(c.layer_scale_init_value), qkv_bias=bool(c.attention_bias),
                qk_norm=bool(c.use_qk_norm), norm_type=c.norm_type, mean_pooling=bool(c.use_mean_pooling))


def _write_internvit(config: VisionConfig, d: dict) -> None:
    d.update(layer_scale_init_value=config.layerscale_value, attention_bias=config.qkv_bias,
             use_qk_norm=config.qk_norm, norm_type=config.norm_type, use_mean_pooling=config.mean_pooling)


registry.register_tower(("internvl_vision",), InternVisionTower, fields=_internvit_fields,
                        write=_write_internvit)
