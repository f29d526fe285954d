"""Decoder-only LM: LLaMA / Vicuna and Qwen2, numerically equal to transformers'
LlamaForCausalLM / Qwen2ForCausalLM. Parameter tree mirrors HF: ``model.embed_tokens``,
``model.layers_N.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head`` (absent when embeddings are tied).

Padding: ``attention_mask`` [B, T] (1 = token, 0 = pad) works for left and right padding.
``position_ids`` default to ``arange(T)`` exactly as a transformers forward call does; pass
``cumsum(mask) - 1`` yourself for left-padded generation-style positions.
Layers run as a Python loop (compile time is small at the sizes tested; per-layer names stay
equal to HF's).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from ..config import TextConfig
from .attention import Attention, make_attention_mask
from .layers import RMSNorm, activation
from .outputs import CausalLMOutput, KVCache
from .rope import apply_rotary, rotary_embedding


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = partial(nn.Dense, use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        h = activation(c.hidden_act)(dense(c.intermediate_size, name="gate_proj")(x))
        h = h * dense(c.intermediate_size, name="up_proj")(x)
        return dense(c.hidden_size, name="down_proj")(h)


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cos, sin, output_attentions=False, kv_cache=None, cache_index=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rope = lambda t: apply_rotary(t, cos, sin)  # noqa: E731
        h, weights, kv_cache = Attention(c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                         qkv_bias=c.qkv_bias, out_bias=c.o_bias, out_name="o_proj",
                                         name="self_attn", **kw)(
            RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x), mask, rope, output_attentions,
            kv_cache, cache_index)
        x = x + h
        x = x + GatedMLP(c, name="mlp", **kw)(
            RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x))
        return x, weights, kv_cache


class DecoderModel(nn.Module):
    """Embedding + decoder layers + final norm (HF's LlamaModel / Qwen2Model).

    ``remat``: recompute each layer's activations in the backward pass (nn.remat) instead of
    keeping them: less memory for training, same numbers, same param names.
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, **kw)
        layer = nn.remat(DecoderLayer, static_argnums=(5,)) if self.remat else DecoderLayer
        self.layers = [layer(c, name=f"layers_{i}", **kw) for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, **kw)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, attention_mask=None, position_ids=None,
                 output_attentions=False, cache: Optional[KVCache] = None):
        """inputs_embeds [B, T, D] -> (normed last [B, T, D], hidden states, attentions, cache).

        With a ``cache`` the T tokens go to slots [index, index + T), attend to every earlier
        slot the cache mask keeps, and ``position_ids`` default to the row's next positions
        (``cache.position`` + running count of kept tokens, as in generation).
        """
        b, t, _ = inputs_embeds.shape
        if cache is None:
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = make_attention_mask(attention_mask, t, t, causal=True)
        else:
            keep = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
            if position_ids is None:
                position_ids = generation_positions(keep, cache.position)
            slots = jax.lax.dynamic_update_slice(cache.mask, keep, (0, cache.index))
            s = slots.shape[1]
            causal = jnp.arange(s)[None, :] <= (cache.index + jnp.arange(t))[:, None]
            mask = causal[None, None] & slots.astype(bool)[:, None, None, :]
        cos, sin = rotary_embedding(self.config, position_ids)
        x = inputs_embeds.astype(self.dtype)
        states, attns, kvs = [x], [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, w, kv = layer(x, mask, cos, sin, output_attentions, kv,
                             None if cache is None else cache.index)
            states.append(x)
            attns.append(w)
            kvs.append(kv)
        x = self.norm(x)
        states[-1] = x  # HF convention: the last hidden state is the normed one
        if cache is not None:
            last = jnp.max(jnp.where(keep > 0, position_ids, -1), axis=1) + 1
            cache = KVCache(keys=tuple(k for k, _ in kvs), values=tuple(v for _, v in kvs),
                            mask=slots, index=cache.index + t,
                            position=jnp.maximum(cache.position, last).astype(jnp.int32))
        return x, tuple(states), tuple(attns), cache


def generation_positions(mask, start):
    """Position ids as generation assigns them: mask [B, T] (1 = token), start [B] the row's
    next position -> start + running count of tokens - 1 (pads get the position after them)."""
    return start[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def init_cache(config: TextConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    """An empty cache of ``length`` slots for ``batch`` rows."""
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    return KVCache(keys=zeros, values=zeros, mask=jnp.zeros((batch, length), jnp.int32),
                   index=jnp.asarray(0, jnp.int32), position=jnp.zeros((batch,), jnp.int32))


class CausalLM(nn.Module):
    """``__call__(input_ids [B, T] | inputs_embeds [B, T, D], attention_mask, position_ids)``
    -> CausalLMOutput with float32 logits [B, T, V]."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def setup(self):
        self.model = DecoderModel(self.config, self.dtype, self.param_dtype, self.remat)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype)

    def embed(self, input_ids):
        """input_ids [B, T] -> token embeddings [B, T, D]."""
        return self.model.embed(input_ids)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None,
                 inputs_embeds: Optional[jnp.ndarray] = None, output_hidden_states: bool = False,
                 output_attentions: bool = False, cache: Optional[KVCache] = None) -> CausalLMOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        if attention_mask is not None and attention_mask.shape != inputs_embeds.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"{tuple(inputs_embeds.shape[:2])} (batch, sequence)")
        x, states, attns, cache = self.model(inputs_embeds, attention_mask, position_ids,
                                             output_attentions, cache)
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        return CausalLMOutput(logits=logits.astype(jnp.float32),
                              hidden_states=states if output_hidden_states else None,
                              attentions=attns if output_attentions else None, cache=cache)
