"""Decoder-only LM: LLaMA / Vicuna and Qwen2, numerically equal to transformers'
LlamaForCausalLM / Qwen2ForCausalLM. Parameter tree mirrors HF: ``model.embed_tokens``,
``model.layers_N.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head`` (absent when embeddings are tied).

Padding: ``attention_mask`` [B, T] (1 = token, 0 = pad) works for left and right padding.
``position_ids`` default to ``arange(T)`` exactly as a transformers forward call does; pass
``cumsum(mask) - 1`` yourself for left-padded generation-style positions.
Layers run as a Python loop by default (per-layer names stay HF's; at the depths tested
compile time is seconds). ``scan_layers=True`` runs them as one ``nn.scan`` instead: the
params of all layers are stacked under ``model.layers`` with a leading [L] axis
(:func:`stack_layers` / :func:`unstack_layers` convert; ``load_pretrained(...,
scan_layers=True)`` and ``save_pretrained`` do it for you). The program holds one layer body:
compile time and, under fsdp, the all-gathered weights no longer grow with depth. The loop stays
the default: the KV cache and the interventions address single layers (``generate`` runs a
scanned model in the loop layout).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from ..config import TextConfig
from ..interventions import Interventions, pruning
from ..interventions.var import redistribute
from ..sinks.detect import llm_sink_mask
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
    fused_attention: bool = False

    @nn.compact
    def __call__(self, x, mask, cos, sin, output_attentions=False, kv_cache=None, cache_index=None,
                 adjust=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rope = lambda t: apply_rotary(t, cos, sin)  # noqa: E731
        h, weights, kv_cache = Attention(c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                         qkv_bias=c.qkv_bias, out_bias=c.o_bias, out_name="o_proj",
                                         fused=self.fused_attention, name="self_attn", **kw)(
            RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x), mask, rope, output_attentions,
            kv_cache, cache_index, adjust)
        x = x + h
        x = x + GatedMLP(c, name="mlp", **kw)(
            RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x))
        return x, weights, kv_cache


class ScannedDecoderLayer(DecoderLayer):
    """The ``nn.scan`` body: (x, mask, cos, sin, need weights) -> (x, (x, attention weights))."""

    def __call__(self, x, mask, cos, sin, output_attentions=False):
        x, weights, _ = super().__call__(x, mask, cos, sin, output_attentions)
        return x, (x, weights)


REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_policy(name: str):
    """A ``jax.checkpoint_policies`` entry by name: what the backward pass may keep instead of
    recomputing (``nothing_saveable``: only layer inputs; ``dots_saveable``: also matmul
    outputs, more memory and less recompute)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {name!r} not one of {REMAT_POLICIES}")
    return getattr(jax.checkpoint_policies, name)


class DecoderModel(nn.Module):
    """Embedding + decoder layers + final norm (HF's LlamaModel / Qwen2Model).

    ``remat``: recompute each layer's activations in the backward pass (nn.remat) instead of
    keeping them: less memory for training, same numbers, same param names; ``remat_policy``
    (one of :data:`REMAT_POLICIES`) says what may be kept.
    ``scan_layers``: one ``nn.scan`` over the layers, params stacked under ``layers`` (see the
    module docstring); no KV cache or interventions in this layout.
    ``fused_attention``: jax.nn.dot_product_attention in every layer whose weights are not needed.
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    fused_attention: bool = False
    scan_layers: bool = False
    remat_policy: str = "nothing_saveable"

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, fused_attention=self.fused_attention)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
        layer = ScannedDecoderLayer if self.scan_layers else DecoderLayer
        if self.remat:  # arg 5 (after self, x, mask, cos, sin): need attention weights, static
            layer = nn.remat(layer, static_argnums=(5,), policy=remat_policy(self.remat_policy),
                             prevent_cse=not self.scan_layers)
        if self.scan_layers:
            self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(nn.broadcast,) * 4, length=c.num_hidden_layers)(
                c, name="layers", **kw)
        else:
            self.layers = [layer(c, name=f"layers_{i}", **kw) for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, attention_mask=None, position_ids=None,
                 output_attentions=False, cache: Optional[KVCache] = None,
                 interventions: Optional[Interventions] = None, visual_mask=None, sink_mask=None,
                 num_visual: int = 0):
        """inputs_embeds [B, T, D] -> (normed last [B, T, D], hidden states, attentions, cache).

        With a ``cache`` the T tokens go to slots [index, index + T), attend to every earlier
        slot the cache mask keeps, and ``position_ids`` default to the row's next positions
        (``cache.position`` + running count of kept tokens, as in generation).

        ``interventions`` (token pruning, VAR; :mod:`vitsink_jax.interventions`) need
        ``visual_mask`` [B, T] (visual-token slots) and ``sink_mask`` [B, T] (ViT sinks); pruning
        drops int(ratio x ``num_visual``) tokens per row (every row must hold ``num_visual``
        visual tokens). With pruning, layers after K run on the T' kept tokens; the outputs are
        scattered back to T slots (zeros at pruned tokens; attentions of those layers stay
        [B, H, T', T']).
        """
        b, t, _ = inputs_embeds.shape
        prune = None if interventions is None else interventions.prune
        var = None if interventions is None else interventions.var
        if (prune or var) and (visual_mask is None or sink_mask is None):
            raise ValueError("token pruning and VAR need visual_mask and sink_mask")
        n = self.config.num_hidden_layers
        if self.scan_layers and (cache is not None or prune or var):
            raise NotImplementedError("scan_layers=True runs plain forwards (training, scoring); "
                                      "for a KV cache or interventions use the loop layout "
                                      "(unstack_layers(params), scan_layers=False)")
        if prune is not None and prune.layer >= n:
            raise ValueError(f"token pruning after layer {prune.layer} needs more than "
                             f"{n} LLM layers")
        if var is not None and cache is not None and (
                prune is not None or cache.visual is None
                or (var.sinks == "dims") != (cache.layer_sinks is not None)):
            raise NotImplementedError(f"VAR with a KV cache needs no token pruning and init_cache("
                                      f"..., var={var.sinks!r}) (generate() does this)")
        if prune is not None and cache is not None and (cache.late_mask is None or cache.split != prune.layer
                                                        or cache.drop != prune.dropped(num_visual)):
            raise ValueError("token pruning with a KV cache needs init_cache(..., pruning=(layer, "
                             "dropped tokens)) matching the pruning (generate() does this)")
        if cache is None:
            if position_ids is None:
                position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = make_attention_mask(attention_mask, t, t, causal=True)
        else:
            keep = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
            if position_ids is None:
                position_ids = generation_positions(keep, cache.position)
            last = jnp.max(jnp.where(keep > 0, position_ids, -1), axis=1) + 1
            slots, mask = cache_mask(cache.mask, keep, cache.index)
        cos, sin = rotary_embedding(self.config, position_ids)
        x = inputs_embeds.astype(self.dtype)
        states, attns, kvs, kept, late_slots = [x], [], [], None, None
        key_visual, key_sinks = visual_mask, sink_mask  # VAR reads the keys' masks
        if var is not None and cache is not None:  # ... over the cache slots
            key_visual, key_sinks = (jax.lax.dynamic_update_slice(
                slot, new.astype(slot.dtype), (0, cache.index)) for slot, new in
                ((cache.visual, visual_mask), (cache.sinks, sink_mask)))
        index = None if cache is None else cache.index
        # VAR sinks="dims" with a cache: each layer's LLM-sink mask over the cached slots
        layer_sinks = None if cache is None or cache.layer_sinks is None else list(cache.layer_sinks)
        if self.scan_layers:
            x, (hidden, weights) = self.layers(x, mask, cos, sin, output_attentions)
            states += list(hidden)
            attns = list(weights) if output_attentions else attns
        else:
            for i, layer in enumerate(self.layers):
                if prune is not None and i == prune.layer:  # FastV: drop the least-attended tokens
                    received = attns[-1] if cache is None else jax.lax.dynamic_slice_in_dim(
                        attns[-1], cache.index, t, axis=-1)
                    scores = pruning.attention_received(received, attention_mask, prune.score)
                    n_drop = prune.dropped(num_visual)
                    kept = pruning.keep_indices(scores, visual_mask,
                                                sink_mask if prune.keep_sinks else None, n_drop)
                    x, position_ids, visual_mask, sink_mask = (
                        pruning.gather_tokens(a, kept) for a in (x, position_ids, visual_mask, sink_mask))
                    key_visual, key_sinks = visual_mask, sink_mask  # (VAR + pruning: no cache here)
                    if attention_mask is not None:
                        attention_mask = pruning.gather_tokens(attention_mask, kept)
                    if cache is None:
                        mask = make_attention_mask(attention_mask, t - n_drop, t - n_drop, causal=True)
                    else:
                        late_keep = pruning.gather_tokens(keep, kept)
                    cos, sin = rotary_embedding(self.config, position_ids)
                if cache is not None and cache.late_mask is not None and i == cache.split:
                    # the pruned layers' own, shorter cache: the pruning prefill writes its kept tokens
                    # from the same slot; later steps come ``drop`` slots earlier than in layers < K
                    index = cache.index if kept is not None else cache.index - cache.drop
                    late_slots, mask = cache_mask(cache.late_mask, late_keep if kept is not None else keep,
                                                  index)
                adjust = None
                if var is not None and i >= var.first_layer and not (var.skip_last and i == n - 1):
                    sinks = key_sinks if var.sinks == "vit" else llm_sink_mask(
                        x, jnp.asarray(var.sink_dims, jnp.int32), var.tau)
                    if layer_sinks is not None:  # this layer's mask of every cached slot
                        sinks = layer_sinks[i] = jax.lax.dynamic_update_slice(
                            layer_sinks[i], sinks.astype(jnp.int32), (0, cache.index))
                    adjust = partial(redistribute, visual=key_visual.astype(bool),
                                     sinks=sinks.astype(bool), p=var.p, rho=var.rho, summ=var.summ)
                kv = None if cache is None else (cache.keys[i], cache.values[i])
                need = output_attentions or (prune is not None and i == prune.layer - 1)
                x, w, kv = layer(x, mask, cos, sin, need, kv, index, adjust)
                states.append(x)
                attns.append(w)
                kvs.append(kv)
        x = self.norm(x)
        states[-1] = x  # HF convention: the last hidden state is the normed one
        if kept is not None:
            x = pruning.scatter_tokens(x, kept, t)
            states = [s_ if s_.shape[1] == t else pruning.scatter_tokens(s_, kept, t) for s_ in states]
        if cache is not None:
            cache = cache.replace(keys=tuple(k for k, _ in kvs), values=tuple(v for _, v in kvs),
                                  mask=slots, index=cache.index + t, late_mask=late_slots,
                                  position=jnp.maximum(cache.position, last).astype(jnp.int32))
            if var is not None:
                cache = cache.replace(visual=key_visual, sinks=key_sinks, layer_sinks=None
                                      if layer_sinks is None else tuple(layer_sinks))
        return x, tuple(states), tuple(attns) if output_attentions else (None,) * n, cache


def cache_mask(slot_mask, keep, index):
    """(updated slot mask [B, S], attention mask [B, 1, T, S]) for T new tokens written at slot
    ``index``: each attends to the kept slots up to its own."""
    t = keep.shape[1]
    slots = jax.lax.dynamic_update_slice(slot_mask, keep.astype(slot_mask.dtype), (0, index))
    causal = jnp.arange(slots.shape[1])[None, :] <= (index + jnp.arange(t))[:, None]
    return slots, causal[None, None] & slots.astype(bool)[:, None, None, :]


def generation_positions(mask, start):
    """Position ids as generation assigns them: mask [B, T] (1 = token), start [B] the row's
    next position -> start + running count of tokens - 1 (pads get the position after them)."""
    return start[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def init_cache(config: TextConfig, batch: int, length: int, dtype=jnp.float32,
               pruning: tuple = (), var: Optional[str] = None) -> KVCache:
    """An empty cache of ``length`` slots for ``batch`` rows. ``pruning`` = (layer K, tokens
    dropped per row): layers from K get ``length - dropped`` slots (FastV's shorter cache).
    ``var`` (VAR during generation, its sink source): "vit" keeps the visual / ViT-sink masks
    of the slots, "dims" also each layer's LLM-sink mask."""
    if var not in (None, "vit", "dims"):
        raise ValueError(f"init_cache var={var!r}: None, 'vit' or 'dims'")
    slots = lambda: jnp.zeros((batch, length), jnp.int32) if var else None  # noqa: E731
    split, drop = pruning or (config.num_hidden_layers, 0)
    def zeros(i):
        return jnp.zeros((batch, length - (drop if i >= split else 0), config.num_key_value_heads,
                          config.head_dim), dtype)
    keys = tuple(zeros(i) for i in range(config.num_hidden_layers))
    return KVCache(keys=keys, values=keys, mask=jnp.zeros((batch, length), jnp.int32),
                   index=jnp.asarray(0, jnp.int32), position=jnp.zeros((batch,), jnp.int32),
                   late_mask=jnp.zeros((batch, length - drop), jnp.int32) if pruning else None,
                   drop=drop, split=split if pruning else 0,
                   visual=slots(), sinks=slots(),
                   layer_sinks=tuple(slots() for _ in keys) if var == "dims" else None)


_LAYER = re.compile(r"layers_(\d+)")


def _decoders(tree, convert):
    """``tree`` with ``convert`` applied to every decoder's param dict (the one holding
    ``embed_tokens``: DecoderModel's)."""
    if not isinstance(tree, Mapping):
        return tree
    if "embed_tokens" in tree:
        return convert(dict(tree))
    return {k: _decoders(v, convert) for k, v in tree.items()}


def stack_layers(params):
    """Loop layout -> scanned layout: each decoder's ``layers_0`` ... ``layers_{L-1}`` become
    ``layers`` with every leaf stacked on a new leading [L] axis. Other params are unchanged;
    a tree already scanned is returned as it is."""
    def convert(d):
        index = {k: int(m[1]) for k in d if (m := _LAYER.fullmatch(k))}
        names = sorted(index, key=index.get)
        if not names:
            return d
        if names != [f"layers_{i}" for i in range(len(names))]:
            raise ValueError(f"decoder layers {names} are not layers_0 ... layers_{len(names) - 1}")
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(d.pop(k) for k in names))
        return {**d, "layers": stacked}
    return _decoders(params, convert)


def unstack_layers(params):
    """Scanned layout -> loop layout (HF's per-layer names), the inverse of
    :func:`stack_layers`; a tree already in the loop layout is returned as it is."""
    def convert(d):
        if "layers" not in d:
            return d
        stacked = d.pop("layers")
        n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
        return {**d, **{f"layers_{i}": jax.tree_util.tree_map(lambda x: x[i], stacked)
                        for i in range(n)}}
    return _decoders(params, convert)


class CausalLM(nn.Module):
    """``__call__(input_ids [B, T] | inputs_embeds [B, T, D], attention_mask, position_ids)``
    -> CausalLMOutput with float32 logits [B, T, V]."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False  # remat, fused_attention, scan_layers, remat_policy: see DecoderModel
    fused_attention: bool = False
    scan_layers: bool = False
    remat_policy: str = "nothing_saveable"

    def setup(self):
        self.model = DecoderModel(self.config, self.dtype, self.param_dtype, self.remat,
                                  self.fused_attention, self.scan_layers, self.remat_policy)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype)

    def embed(self, input_ids):
        """input_ids [B, T] -> token embeddings [B, T, D]."""
        return self.model.embed(input_ids)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None,
                 inputs_embeds: Optional[jnp.ndarray] = None, output_hidden_states: bool = False,
                 output_attentions: bool = False, cache: Optional[KVCache] = None,
                 **interventions) -> CausalLMOutput:
        """``interventions``: ``interventions``, ``visual_mask``, ``sink_mask``, ``num_visual``
        as in :class:`DecoderModel` (the LVLM passes them)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        if attention_mask is not None and attention_mask.shape != inputs_embeds.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"{tuple(inputs_embeds.shape[:2])} (batch, sequence)")
        x, states, attns, cache = self.model(inputs_embeds, attention_mask, position_ids,
                                             output_attentions, cache, **interventions)
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        return CausalLMOutput(logits=logits.astype(jnp.float32),
                              hidden_states=states if output_hidden_states else None,
                              attentions=attns if output_attentions else None, cache=cache)
