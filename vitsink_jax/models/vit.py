"""CLIP and SigLIP vision towers, numerically equal to transformers' CLIPVisionModel and
SiglipVisionModel. Parameter names mirror HF (``embeddings.patch_embedding``, ``pre_layrnorm``,
``encoder.layers_N.self_attn.q_proj``, ``post_layernorm``, ``head``), so conversion is a table.

Layers run as a Python loop: vision towers here are at most a few dozen layers and the loop keeps
per-layer names equal to HF's (a scanned variant belongs to the fast-inference work).
"""

from __future__ import annotations


import jax.numpy as jnp
from flax import linen as nn

from ..config import VisionConfig
from . import registry
from .attention import Attention, dot_product_attention
from .layers import ConfigModule, PreNormBlock, VisionMLP, patch_conv, prepend_token
from .outputs import VisionOutput
from .tower import VisionTower, check_pixels, encode, tower_output, with_registers


class VisionEmbeddings(ConfigModule):
    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [B, C, H, W] (HF's NCHW) -> tokens [B, N, E]."""
        c = self.config
        x = patch_conv(pixel_values, c, "patch_embedding", not c.has_class_token, self.dtype, self.param_dtype)
        if c.has_class_token:
            x = prepend_token(self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,),
                                         self.param_dtype), x)
        pos = nn.Embed(c.num_positions, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="position_embedding")(jnp.arange(c.num_positions))
        return x + pos[None]


class EncoderLayer(PreNormBlock):
    """CLIP / SigLIP's pre-LN block: x + attn(layer_norm1(x)); x + mlp(layer_norm2(x))."""

    def attend(self, x, output_attentions):
        c = self.config
        h, weights, _ = Attention(c.num_attention_heads, c.num_attention_heads,
                                  c.hidden_size // c.num_attention_heads, name="self_attn", **self.kw)(
            x, output_attentions=output_attentions)
        return h, weights


class AttentionPoolingHead(ConfigModule):
    """SigLIP's multihead attention pooling (torch.nn.MultiheadAttention with a learned probe)."""

    @nn.compact
    def __call__(self, x):  # [B, N, E] -> [B, E]
        c = self.config
        e, h = c.hidden_size, c.num_attention_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        probe = self.param("probe", nn.initializers.normal(0.02), (1, 1, e), self.param_dtype)
        attn = _TorchMultiheadAttention(e, h, name="attention", **kw)
        out = attn(jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, e)), x)
        res = out
        out = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layernorm", **kw)(out)
        out = res + VisionMLP(e, c.intermediate_size, c.hidden_act, name="mlp", **kw)(out)
        return out[:, 0]


class _TorchMultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention layout: packed ``in_proj_weight`` [3E, E] and ``out_proj``."""

    embed_dim: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query, kv):
        e, h = self.embed_dim, self.num_heads
        w = self.param("in_proj_weight", nn.initializers.lecun_normal(), (3 * e, e), self.param_dtype)
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * e,), self.param_dtype)
        w, bias = w.astype(self.dtype), bias.astype(self.dtype)
        q = query @ w[:e].T + bias[:e]
        k = kv @ w[e:2 * e].T + bias[e:2 * e]
        v = kv @ w[2 * e:].T + bias[2 * e:]
        split = lambda t: t.reshape(t.shape[0], t.shape[1], h, e // h)  # noqa: E731
        out, _ = dot_product_attention(split(q), split(k), split(v))
        out = out.reshape(query.shape)
        return nn.Dense(e, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(out)


class VisionTransformer(VisionTower):
    """CLIP or SigLIP vision tower (chosen by ``config.model_type``).

    ``__call__(pixel_values [B, C, H, W])`` -> VisionOutput. ``hidden_states`` (on request) is
    the HF tuple: embeddings (after CLIP's pre_layrnorm) then every layer's output, before any
    post-LN. H and W must equal ``config.image_size``.
    """

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states: bool = False,
                 output_attentions: bool = False) -> VisionOutput:
        c = self.config
        check_pixels(c, pixel_values)
        ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name, **self.kw)  # noqa: E731
        ttr = self.test_time_registers
        # test-time registers join before CLIP's pre-LayerNorm (the authors' code)
        x = with_registers(VisionEmbeddings(c, name="embeddings", **self.kw)(pixel_values), ttr)
        if c.has_class_token:
            x = ln("pre_layrnorm")(x)
        last, states, attns = encode(x, c, ttr, output_attentions, layer=EncoderLayer, **self.kw)
        if c.has_class_token:  # CLIP: last_hidden_state un-normed, pooled = post-LN CLS
            pooled = ln("post_layernorm")(last[:, 0])
        else:  # SigLIP: post-LN on every token, optional attention-pooling head
            last = ln("post_layernorm")(last)
            pooled = AttentionPoolingHead(c, name="head", **self.kw)(last) if c.vision_use_head else None
        return tower_output(last, pooled, states, attns, output_hidden_states, output_attentions)


def _siglip_fields(c) -> dict:
    return dict(vision_use_head=bool(getattr(c, "vision_use_head", False)))


def _write_siglip(config: VisionConfig, d: dict) -> None:
    d["vision_use_head"] = config.vision_use_head


def _vision_half(d: dict) -> VisionConfig:
    """A full CLIP / SigLIP checkpoint's config.json (model_type "clip" / "siglip"): its vision half."""
    return VisionConfig.from_hf(dict(d.get("vision_config") or {}, model_type=d["model_type"] + "_vision_model"))


registry.register_tower(("clip_vision_model",), VisionTransformer)
registry.register_tower(("siglip_vision_model",), VisionTransformer, fields=_siglip_fields, write=_write_siglip)
registry.register_tower(("clip", "siglip"), read=_vision_half, alias=True)
