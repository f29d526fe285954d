"""Phi-1 / Phi-2 decoder block (transformers' PhiDecoderLayer), numerically equal to
transformers' PhiForCausalLM inside :class:`vitsink_jax.models.llm.DecoderModel`.

One LayerNorm feeds attention and the MLP in parallel: ``x + attn(ln(x)) + fc2(gelu(fc1(ln(x))))``;
q / k / v and the output projection ``dense`` have biases, RoPE rotates each head's leading
``config.rotary_dim`` dims (partial_rotary_factor), and ``qk_layernorm`` adds a LayerNorm over
each head's queries and keys. The model around it (embedding, ``final_layernorm``, the LM head
with its bias, KV cache, interventions, scanned layers) is the shared one of llm.py. Phi-3 is
LLaMA's block (its fused q/k/v and gate/up tensors are split when a checkpoint is read), so it
needs no class here.
"""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp
from flax import linen as nn

from ..config import TextConfig
from . import registry
from .attention import DecoderBlock
from .layers import activation


class PhiMLP(nn.Module):
    """fc2(act(fc1(x))), both with biases."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        c = self.config
        dense = partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = activation(c.hidden_act)(dense(c.intermediate_size, name="fc1")(x))
        return dense(c.hidden_size, name="fc2")(h)


class PhiDecoderLayer(DecoderBlock):
    """Phi's parallel block: x + attn(ln(x)) + mlp(ln(x))."""

    @nn.compact
    def __call__(self, x, mask, cos, sin, output_attentions=False, kv_cache=None, cache_index=None,
                 adjust=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.LayerNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        attn, weights, kv_cache = self.attend(
            h, mask, cos, sin, output_attentions, kv_cache, cache_index, adjust, qkv_bias=True,
            out_bias=True, out_name="dense",
            qk_norm="layernorm" if c.qk_layernorm else None, qk_norm_eps=c.rms_norm_eps)
        return attn + PhiMLP(c, name="mlp", **kw)(h) + x, weights, kv_cache


def _phi_fields(c) -> dict:
    return dict(rms_norm_eps=c.layer_norm_eps, qk_layernorm=bool(getattr(c, "qk_layernorm", False)))


def _write_phi(config: TextConfig, d: dict) -> None:
    d["layer_norm_eps"] = d.pop("rms_norm_eps")
    d["qk_layernorm"] = config.qk_layernorm


def _phi3_fields(c) -> dict:
    return dict(sliding_window=getattr(c, "sliding_window", None))


def _write_phi3(config: TextConfig, d: dict) -> None:
    d["sliding_window"] = config.sliding_window


registry.register_llm(("phi",), fields=_phi_fields, write=_write_phi)
registry.register_llm(("phi3",), fields=_phi3_fields, write=_write_phi3)
