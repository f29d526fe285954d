"""CLIP and SigLIP vision towers, numerically equal to transformers' CLIPVisionModel and
SiglipVisionModel. Parameter names mirror HF (``embeddings.patch_embedding``, ``pre_layrnorm``,
``encoder.layers_N.self_attn.q_proj``, ``post_layernorm``, ``head``), so conversion is a table.

Layers run as a Python loop: vision towers here are at most a few dozen layers and the loop keeps
per-layer names equal to HF's (a scanned variant belongs to the fast-inference work).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax.numpy as jnp
from flax import linen as nn

from ..config import VisionConfig
from ..parallel import constrain_rows
from .attention import Attention, dot_product_attention
from .layers import activation
from .outputs import VisionOutput
from ..interventions import TestTimeRegisters
from . import registry
from ..interventions.registers import move_to_registers


def check_pixels(config: VisionConfig, pixel_values) -> None:
    """Raises ValueError naming the shape unless pixel_values is [B, C, S, S] at the tower's
    channels and image size."""
    expected = (config.num_channels, config.image_size, config.image_size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                         f"[B, {', '.join(map(str, expected))}] for this {config.model_type}")


def active(ttr: Optional[TestTimeRegisters]) -> bool:
    """Test-time registers are on (a config with at least one neuron)."""
    return ttr is not None and len(ttr.neurons) > 0


def with_registers(x, ttr: Optional[TestTimeRegisters]):
    """Appends the test-time registers (zeros) to the tokens [B, N, E] -> [B, N + R, E]."""
    if not active(ttr):
        return x
    return jnp.concatenate([x, jnp.zeros((x.shape[0], ttr.registers, x.shape[2]), x.dtype)], 1)


def without_registers(ttr: Optional[TestTimeRegisters], last, states, attns):
    """Drops the test-time registers from the tower's outputs (attention to them left out)."""
    if not active(ttr):
        return last, states, attns
    r = ttr.registers
    return (last[:, :-r], tuple(s[:, :-r] for s in states),
            tuple(None if a is None else a[:, :, :-r, :-r] for a in attns))


def register_edit(ttr: Optional[TestTimeRegisters], layer: int, config: VisionConfig):
    """The MLP activation edit of ``layer`` (None when it has no register neuron)."""
    if not active(ttr):
        return None
    neurons = [n for at, n in ttr.neurons if at == layer]
    if not neurons:
        return None
    return partial(move_to_registers, neurons=tuple(neurons), registers=ttr.registers,
                   prefix=config.prefix_tokens, scale=ttr.scale, value=ttr.value)


class VisionEmbeddings(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [B, C, H, W] (HF's NCHW) -> tokens [B, N, E]."""
        c = self.config
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)
        x = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=c.patch_size,
                    padding="VALID", use_bias=not c.has_class_token, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="patch_embedding")(x)
        x = x.reshape(x.shape[0], -1, c.hidden_size)
        if c.has_class_token:
            cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,),
                             self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, c.hidden_size)), x], 1)
        pos = nn.Embed(c.num_positions, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="position_embedding")(jnp.arange(c.num_positions))
        return x + pos[None]


class VisionMLP(nn.Module):
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


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_attentions=False, edit=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name, **kw)  # noqa: E731
        h, weights, _ = Attention(c.num_attention_heads, c.num_attention_heads,
                                  c.hidden_size // c.num_attention_heads, name="self_attn", **kw)(
            ln("layer_norm1")(x), output_attentions=output_attentions)
        x = x + h
        x = x + VisionMLP(c.hidden_size, c.intermediate_size, c.hidden_act, name="mlp", **kw)(
            ln("layer_norm2")(x), edit)
        return x, weights


class AttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling (torch.nn.MultiheadAttention with a learned probe)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

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


class Encoder(nn.Module):
    """The tower's blocks as a loop: ``layer`` (called (x, output_attentions, MLP edit) ->
    (x, weights)) named ``{layer_name}_{i}`` as HF's ``encoder.layers.i`` (CLIP / SigLIP) or
    ``encoder.layer.i`` (InternViT)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    test_time_registers: Optional[TestTimeRegisters] = None
    layer: type = None  # default: EncoderLayer
    layer_name: str = "layers"

    @nn.compact
    def __call__(self, x, output_attentions=False):
        """Returns (last [B, N, E], hidden_states L+1 x [B, N, E], attentions L x [B, H, N, N])."""
        states, attns = [x], []
        layer = self.layer or EncoderLayer
        for i in range(self.config.num_hidden_layers):
            x, w = layer(self.config, self.dtype, self.param_dtype, name=f"{self.layer_name}_{i}")(
                x, output_attentions, register_edit(self.test_time_registers, i, self.config))
            x = constrain_rows(x)
            states.append(x)
            attns.append(w)
        return x, tuple(states), tuple(attns)


class VisionTransformer(nn.Module):
    """CLIP or SigLIP vision tower (chosen by ``config.model_type``).

    ``__call__(pixel_values [B, C, H, W])`` -> VisionOutput. ``hidden_states`` (on request) is
    the HF tuple: embeddings (after CLIP's pre_layrnorm) then every layer's output, before any
    post-LN. H and W must equal ``config.image_size``.
    """

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
        ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name, **kw)  # noqa: E731
        ttr = self.test_time_registers
        # test-time registers join before CLIP's pre-LayerNorm (the authors' code)
        x = with_registers(VisionEmbeddings(c, name="embeddings", **kw)(pixel_values), ttr)
        if c.has_class_token:
            x = ln("pre_layrnorm")(x)
        last, states, attns = Encoder(c, name="encoder", test_time_registers=ttr, **kw)(
            x, output_attentions)
        last, states, attns = without_registers(ttr, last, states, attns)
        if c.has_class_token:  # CLIP: last_hidden_state un-normed, pooled = post-LN CLS
            pooled = ln("post_layernorm")(last[:, 0])
        else:  # SigLIP: post-LN on every token, optional attention-pooling head
            last = ln("post_layernorm")(last)
            pooled = AttentionPoolingHead(c, name="head", **kw)(last) if c.vision_use_head else None
        return VisionOutput(last_hidden_state=last, pooler_output=pooled,
                            hidden_states=states if output_hidden_states else None,
                            attentions=attns if output_attentions else None)


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
