"""InternViT, InternVL's vision tower, numerically equal to transformers' InternVLVisionModel.

A CLS token and absolute position embeddings, then pre-norm blocks (LayerNorm or RMSNorm,
``config.norm_type``) whose attention output and MLP output are each scaled by a learned
per-channel LayerScale (``lambda_1``, ``lambda_2``) before the residual; the attention may
RMS-normalise the whole q and k (``config.qk_norm``) and projects out with
``projection_layer``. Parameter names mirror HF (``embeddings.cls_token``,
``encoder.layer_N.attention.q_proj``, ...). Test-time registers work as in the CLIP tower.
"""

from __future__ import annotations


from flax import linen as nn

from ..config import VisionConfig
from . import registry
from .attention import Attention
from .layers import ConfigModule, PatchEmbeddings, PreNormBlock, RMSNorm, prepend_token
from .outputs import VisionOutput
from .tower import VisionTower, check_pixels, encode, tower_output, with_registers


class InternVisionLayer(PreNormBlock):
    """x + lambda_1 * attn(norm(x)); then + lambda_2 * mlp(norm(x)), LayerNorms or RMSNorms."""

    norm_names = ("layernorm_before", "layernorm_after")

    def norm(self, name):
        c = self.config
        if c.norm_type == "rms_norm":
            return RMSNorm(c.layer_norm_eps, name=name, **self.kw)
        return super().norm(name)

    def attend(self, x, output_attentions):
        c = self.config
        h, weights, _ = Attention(c.num_attention_heads, c.num_attention_heads,
                                  c.hidden_size // c.num_attention_heads, qkv_bias=c.qkv_bias,
                                  out_name="projection_layer", qk_norm="rmsnorm" if c.qk_norm else None,
                                  qk_norm_eps=1e-6, name="attention", **self.kw)(x, output_attentions=output_attentions)
        return h, weights

    def scaled(self, h, which):
        c = self.config
        scale = self.param(f"lambda_{which + 1}", nn.initializers.constant(c.layerscale_value),
                           (c.hidden_size,), self.param_dtype)
        return scale.astype(self.dtype) * h


class InternVisionEmbeddings(ConfigModule):
    """CLS token, patch embeddings and absolute positions: [B, C, H, W] -> [B, 1 + N, E]."""

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        init = nn.initializers.normal(0.02)
        x = PatchEmbeddings(c, self.dtype, self.param_dtype, name="patch_embeddings")(pixel_values)
        cls = self.param("cls_token", init, (1, 1, c.hidden_size), self.param_dtype)
        pos = self.param("position_embeddings", init, (1, c.num_positions, c.hidden_size), self.param_dtype)
        return prepend_token(cls, x) + pos.astype(self.dtype)


class InternVisionTower(VisionTower):
    """``__call__(pixel_values [B, C, H, W])`` -> VisionOutput: ``hidden_states`` = the
    embeddings then every layer's output; ``last_hidden_state`` = the last one, LayerNormed
    unless ``config.mean_pooling``; ``pooler_output`` = the mean of the patch tokens (mean
    pooling) or the CLS token. H and W must equal ``config.image_size`` (InternVL feeds tiles of
    that size)."""

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states: bool = False,
                 output_attentions: bool = False) -> VisionOutput:
        c = self.config
        check_pixels(c, pixel_values)
        ttr = self.test_time_registers
        x = InternVisionEmbeddings(c, name="embeddings", **self.kw)(pixel_values)
        last, states, attns = encode(with_registers(x, ttr), c, ttr, output_attentions, layer=InternVisionLayer,
                                     layer_name="layer", **self.kw)
        if not c.mean_pooling:
            last = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layernorm", **self.kw)(last)
        pooled = last[:, 1:].mean(1) if c.mean_pooling else last[:, 0]
        return tower_output(last, pooled, states, attns, output_hidden_states, output_attentions)


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
