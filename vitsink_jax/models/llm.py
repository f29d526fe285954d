"""Decoder-only LM: LLaMA / Vicuna, Qwen2, Phi-2, Phi-3 and Gemma 3, numerically equal to
transformers' LlamaForCausalLM / Qwen2ForCausalLM / PhiForCausalLM / Phi3ForCausalLM /
Gemma3ForCausalLM. Parameter tree mirrors
HF: ``model.embed_tokens``, ``model.layers_N.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``, ``lm_head`` (absent when
embeddings are tied). Phi-2's block (``self_attn.dense``, ``mlp.fc1/fc2``, ``final_layernorm``, a
head bias) is :class:`vitsink_jax.models.phi.PhiDecoderLayer`; Phi-3 is this LLaMA block;
Gemma 3's sandwich-norm block is :class:`vitsink_jax.models.gemma.GemmaDecoderLayer`, its local
and global layers each read their kind's mask and RoPE (:func:`layer_kinds`).

Padding: ``attention_mask`` [B, T] (1 = token, 0 = pad) works for left and right padding.
``position_ids`` are [B, T], or [B, T, 3] (temporal, height, width) for Qwen2.5-VL's multimodal
RoPE (transformers' [3, B, T] with the axis last).
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

import functools
import re
from functools import partial
from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from ..config import TextConfig
from ..interventions import Interventions, pruning
from ..interventions.var import queries_after_visual, redistribute
from ..sinks.detect import llm_sink_mask
from ..parallel import constrain_rows, whole
from .attention import DecoderBlock, make_attention_mask, same_block, window_mask
from .gemma import GemmaDecoderLayer
from .layers import GatedMLP, RMSNorm
from .outputs import CausalLMOutput, KVCache
from .phi import PhiDecoderLayer
from . import registry
from .rope import rotary_embedding


class DecoderLayer(DecoderBlock):
    """LLaMA's pre-norm block (Qwen2, Phi-3 too): x + attn(norm(x)), then + mlp(norm(x))."""

    @nn.compact
    def __call__(self, x, mask, cos, sin, output_attentions=False, kv_cache=None, cache_index=None,
                 adjust=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, weights, kv_cache = self.attend(
            RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x), mask, cos, sin,
            output_attentions, kv_cache, cache_index, adjust, qkv_bias=c.qkv_bias,
            out_bias=c.o_bias, out_name="o_proj")
        x = x + h
        x = x + GatedMLP(c, name="mlp", **kw)(
            RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x))
        return x, weights, kv_cache


@functools.lru_cache(maxsize=None)
def scan_body(layer: type) -> type:
    """The ``nn.scan`` body of a decoder layer class: (x, masks, ropes, kind, need weights) ->
    (x, (x, attention weights)). masks / ropes hold one mask / (cos, sin) per layer kind
    (:func:`layer_kinds`), broadcast to every step; kind, scanned, is this layer's index into
    them."""
    def __call__(self, x, masks, ropes, kind, output_attentions=False):
        mask, (cos, sin) = masks[0], ropes[0]
        for j in range(1, len(masks)):  # Gemma 3: local or global, picked per layer
            mask = jnp.where(kind == j, masks[j], mask)
            cos, sin = (jnp.where(kind == j, new, old) for new, old in zip(ropes[j], (cos, sin)))
        x, weights, _ = layer.__call__(self, x, mask, cos, sin, output_attentions)
        x = constrain_rows(x)
        return x, (x, weights)

    return type(f"Scanned{layer.__name__}", (layer,), {"__call__": __call__})


def layer_class(config: TextConfig) -> type:
    """The decoder block of a family: Phi-2's parallel block, Gemma 3's sandwich-norm block,
    else LLaMA's."""
    if config.is_phi:
        return PhiDecoderLayer
    return GemmaDecoderLayer if config.is_gemma else DecoderLayer


def layer_kinds(config: TextConfig) -> dict:
    """{sliding window or None: the TextConfig its layers' RoPE reads}, one entry per kind of
    layer (Gemma 3: global and local; other families: one kind), in ``config.layer_windows``
    order of first use."""
    return {w: config if w is None else config.local_rope for w in config.layer_windows}


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
    ``attention_impl``: how each layer attends where its weights are not read (one of
    :data:`~vitsink_jax.models.attention.ATTENTION_IMPLS`; "xla", jax.nn.dot_product_attention,
    by default).
    """

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    attention_impl: str = "xla"
    scan_layers: bool = False
    remat_policy: str = "nothing_saveable"

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
        layer = scan_body(layer_class(c)) if self.scan_layers else layer_class(c)
        if self.remat:  # arg 5 (after self, x, mask, cos, sin / masks, ropes, kind): need
            # attention weights, static
            layer = nn.remat(layer, static_argnums=(5,), policy=remat_policy(self.remat_policy),
                             prevent_cse=not self.scan_layers)
        if self.scan_layers:
            self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                                  length=c.num_hidden_layers)(
                c, name="layers", **kw)
        else:
            self.layers = [layer(c, name=f"layers_{i}", **kw) for i in range(c.num_hidden_layers)]
        if c.is_phi:
            self.final_layernorm = nn.LayerNorm(c.rms_norm_eps, dtype=self.dtype,
                                                param_dtype=self.param_dtype)
        else:
            self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                offset=c.is_gemma)

    def embed(self, input_ids):
        """input_ids [B, T] -> [B, T, D]; Gemma scales them by sqrt(D), a factor rounded to the
        param dtype as transformers' is."""
        # Embed's lookup on the table gathered whole in the training mesh (ZeRO-3; else XLA may
        # look up the rows of the whole batch in the vocabulary-sharded table)
        table = whole(self.embed_tokens.embedding.astype(self.dtype))
        x = constrain_rows(jnp.take(table, input_ids, axis=0))
        if self.config.is_gemma:
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, self.param_dtype).astype(x.dtype)
        return x

    def __call__(self, inputs_embeds, attention_mask=None, position_ids=None,
                 output_attentions=False, cache: Optional[KVCache] = None,
                 interventions: Optional[Interventions] = None, visual_mask=None, sink_mask=None,
                 num_visual: int = 0, image_blocks=None, prompt_mask=None):
        """inputs_embeds [B, T, D] -> (normed last [B, T, D], hidden states, attentions, cache).

        ``image_blocks`` [B, T] int32 (Gemma 3's image attention): each image's id at its
        tokens, -1 elsewhere; the tokens of one image also attend to each other's later tokens
        (bidirectionally, within a layer's sliding window), the rest stays causal.

        With a ``cache`` the T tokens go to slots [index, index + T), attend to every earlier
        slot the cache mask keeps, and ``position_ids`` default to the row's next positions
        (``cache.position`` + running count of kept tokens, as in generation).

        ``interventions`` (token pruning, VAR; :mod:`vitsink_jax.interventions`) need
        ``visual_mask`` [B, T] (visual-token slots) and ``sink_mask`` [B, T] (ViT sinks); pruning
        drops int(ratio x ``num_visual``) tokens per row (every row must hold ``num_visual``
        visual tokens). With pruning, layers after K run on the T' kept tokens; the outputs are
        scattered back to T slots (zeros at pruned tokens; attentions of those layers stay
        [B, H, T', T']). ``prompt_mask`` [B, T] (1 = a prompt token; None: every token): the
        queries whose attention ranks the visual tokens, so that a row holding prompt +
        candidate answer (likelihood scoring) prunes as generation's prefill of the prompt does.
        """
        b, t, _ = inputs_embeds.shape
        prune = None if interventions is None else interventions.prune
        var = None if interventions is None else interventions.var
        self._check(cache, prune, var, visual_mask is not None and sink_mask is not None, num_visual,
                    t if cache is None else cache.mask.shape[1])
        tokens = _Tokens.of_call(attention_mask, position_ids, cache, visual_mask, sink_mask,
                                 image_blocks, b, t)
        # the residual stream stays split over a mesh's batch axes (parallel.constrain_rows)
        x = constrain_rows(inputs_embeds.astype(self.dtype))
        if self.scan_layers:
            states, kept = [x], None
            kinds = layer_kinds(self.config)
            index = {w: j for j, w in enumerate(kinds)}
            x, (hidden, attns) = self.layers(
                x, tuple(tokens.mask(window=w)[1] for w in kinds),
                tuple(rotary_embedding(rc, tokens.position_ids) for rc in kinds.values()),
                jnp.asarray([index[w] for w in self.config.layer_windows], jnp.int32),
                output_attentions)
            states += list(hidden)
        else:
            x, states, attns, kept, cache = self._layer_loop(x, tokens, cache, prune, var, num_visual,
                                                             output_attentions, prompt_mask)
        x = self.final_layernorm(x) if self.config.is_phi else self.norm(x)
        states[-1] = x  # HF convention: the last hidden state is the normed one
        if kept is not None:  # FastV: back to T slots, zeros at the pruned tokens
            x = pruning.scatter_tokens(x, kept, t)
            states = [s_ if s_.shape[1] == t else pruning.scatter_tokens(s_, kept, t) for s_ in states]
        attns = tuple(attns) if output_attentions else (None,) * self.config.num_hidden_layers
        return x, tuple(states), attns, cache

    def _check(self, cache, prune, var, masks_given: bool, num_visual: int, slots: int):
        """Raises on a combination of layout, cache and interventions that ``__call__`` does not
        run (``masks_given``: both ``visual_mask`` and ``sink_mask`` were passed; ``slots``: the
        keys' slots, the tokens or the cache's)."""
        n = self.config.num_hidden_layers
        window = min((w for w in self.config.layer_windows if w is not None), default=None)
        if prune is not None and window is not None and slots > window:
            raise NotImplementedError(f"token pruning over {slots} slots with a sliding window of "
                                      f"{window}: the window of the kept tokens is not defined")
        if (prune or var) and not masks_given:
            raise ValueError("token pruning and VAR need visual_mask and sink_mask")
        if var is not None and var.sinks == "dims" and not var.sink_dims:
            raise ValueError("VAR with sinks='dims' needs sink_dims, the LLM's sink dimensions "
                             "(interventions.var.llm_sink_dims finds them on data), or sinks='vit'")
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

    def _layer_loop(self, x, tokens, cache, prune, var, num_visual, output_attentions,
                    prompt_mask=None):
        """The loop layout: x [B, T, D] through every layer, with the KV cache, FastV pruning
        (ranked by the queries of ``prompt_mask`` [B, T] or None: all)
        and VAR when given -> (last hidden [B, T', D], hidden states [x, L x [B, T or T', D]],
        L attention weights [B, H, T or T', S] or None, kept [B, T'] int32 or None, the
        updated cache or None). T' = T - dropped from layer K on (pruning; else T' = T); S = T
        without a cache, else the cache's slots (S - dropped from its split on)."""
        n = self.config.num_hidden_layers
        index = None if cache is None else cache.index  # the slot the layers write to
        windows, kinds = self.config.layer_windows, layer_kinds(self.config)
        slots, masks = _kind_masks(kinds, tokens, None if cache is None else cache.mask, index)
        ropes = {w: rotary_embedding(rc, tokens.position_ids) for w, rc in kinds.items()}
        key_visual, key_sinks, layer_sinks = _var_keys(var, cache, tokens)
        # from this layer on: the tokens FastV keeps (pruning) and / or the shorter late cache
        split = prune.layer if prune is not None else (
            cache.split if cache is not None and cache.late_mask is not None else n)
        live, states, attns, kvs, kept, late_slots = tokens, [x], [], [], None, None
        for i, layer in enumerate(self.layers):
            if i == split:
                if prune is not None:
                    kept, x, live = _prune(prune, attns[-1], x, live, cache, num_visual, prompt_mask)
                    ropes = {w: rotary_embedding(rc, live.position_ids) for w, rc in kinds.items()}
                    key_visual, key_sinks = live.visual, live.sinks  # (VAR + pruning: no cache)
                if cache is not None:  # the pruning prefill writes its kept tokens from the same
                    # slot; later steps come ``drop`` slots earlier than in layers < K
                    index = cache.index if kept is not None else cache.index - cache.drop
                late_slots, masks = _kind_masks(kinds, live, None if cache is None else cache.late_mask,
                                                index)
            adjust = self._var_adjust(var, i, x, key_visual, key_sinks, layer_sinks,
                                      None if cache is None else cache.index, live.visual)
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            need = output_attentions or (prune is not None and i == prune.layer - 1)
            x, w, kv = layer(x, masks[windows[i]], *ropes[windows[i]], need, kv, index, adjust)
            x = constrain_rows(x)
            states.append(x)
            attns.append(w)
            kvs.append(kv)
        if cache is not None:
            cache = _updated_cache(cache, kvs, tokens, slots, late_slots,
                                   None if var is None else (key_visual, key_sinks, layer_sinks))
        return x, states, attns, kept, cache

    def _var_adjust(self, var, i, x, visual, sinks, layer_sinks, index, query_visual):
        """VAR's edit of layer i's attention probabilities [B, H, T, S] -> [B, H, T, S], or None
        where VAR is off. visual, sinks [B, S]: the keys' visual-token slots and ViT sinks; with
        sinks="dims" the sinks are the LLM sinks of the layer input x [B, T, D] instead, and with
        a cache (``layer_sinks``: L x [B, S] int32 over its slots) they are written into
        ``layer_sinks[i]`` at slot ``index`` and the layer reads every slot's. query_visual
        [B, T]: the visual slots of the T queries (queries="after-image" changes those after
        the last)."""
        if var is None or i < var.first_layer or (var.skip_last and i == self.config.num_hidden_layers - 1):
            return None
        if var.sinks == "dims":
            sinks = llm_sink_mask(x, jnp.asarray(var.sink_dims, jnp.int32), var.tau)
            if layer_sinks is not None:  # this layer's mask of every cached slot
                sinks = layer_sinks[i] = jax.lax.dynamic_update_slice(
                    layer_sinks[i], sinks.astype(jnp.int32), (0, index))
        queries = queries_after_visual(query_visual.astype(bool)) if var.queries == "after-image" else None
        return partial(redistribute, visual=visual.astype(bool), sinks=sinks.astype(bool), p=var.p,
                       rho=var.rho, summ=var.summ, queries=queries,
                       visual_sink_required=var.visual_sink_required)


class _Tokens(NamedTuple):
    """The per-token inputs of the decoder layers, each [B, T]: the call's T tokens, or the T'
    of them FastV pruning keeps (:meth:`gather`). position_ids ([B, T, 3] under multimodal
    RoPE); attention_mask: 1 = token,
    0 = pad, as passed (None: no padding); keep: int32, the tokens a cache stores as attendable
    (attention_mask, default all; None without a cache); visual, sinks: the visual-token slots
    and ViT sinks (interventions only, else None); blocks: Gemma 3's image blocks (the image's
    id, -1 at text; None: all causal)."""

    position_ids: jnp.ndarray
    attention_mask: Optional[jnp.ndarray]
    keep: Optional[jnp.ndarray]
    visual: Optional[jnp.ndarray]
    sinks: Optional[jnp.ndarray]
    blocks: Optional[jnp.ndarray]

    @classmethod
    def of_call(cls, attention_mask, position_ids, cache, visual, sinks, blocks, b: int, t: int):
        """The T tokens of a call; ``position_ids`` default to arange(T) without a cache and to
        :func:`generation_positions` from the rows' next positions with one."""
        keep = None
        if cache is not None:
            keep = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        if position_ids is not None and tuple(position_ids.shape) not in ((b, t), (b, t, 3)):
            raise ValueError(f"position_ids have shape {tuple(position_ids.shape)}; expected [B, T] = "
                             f"{(b, t)} or, for multimodal RoPE, [B, T, 3] (transformers' [3, B, T] "
                             "with the axis moved last: jnp.moveaxis(ids, 0, -1))")
        if position_ids is None:
            position_ids = (jnp.broadcast_to(jnp.arange(t), (b, t)) if cache is None
                            else generation_positions(keep, cache.position))
        return cls(position_ids, attention_mask, keep, visual, sinks, blocks)

    def gather(self, kept):
        """The T' tokens at kept [B, T'] (every field that is set)."""
        return _Tokens(*(None if a is None else pruning.gather_tokens(a, kept) for a in self))

    def mask(self, slot_mask=None, index=None, window=None):
        """The layers' attention mask. Without a cache (``slot_mask`` None): (None, causal and
        padding mask [B or 1, 1, T, T]); with its slot mask [B, S]: :func:`cache_mask` (the slot
        mask with these tokens written at slot ``index``, mask [B, 1, T, S]). ``window``:
        sliding-window attention over slots (None: off)."""
        if slot_mask is None:
            t = self.position_ids.shape[1]
            return None, make_attention_mask(self.attention_mask, t, t, causal=True, window=window,
                                             blocks=self.blocks)
        return cache_mask(slot_mask, self.keep, index, window, self.blocks)

    def next_position(self):
        """[B]: each row's position after its last kept token (with a cache); with multimodal
        ids [B, T, 3], after the largest of any axis (transformers' rope deltas)."""
        ids = self.position_ids if self.position_ids.ndim == 2 else self.position_ids.max(-1)
        return jnp.max(jnp.where(self.keep > 0, ids, -1), axis=1) + 1


def _kind_masks(kinds: dict, tokens: _Tokens, slot_mask, index):
    """(slot mask or None, {window: attention mask}) of ``tokens`` for each layer kind
    (:meth:`_Tokens.mask`)."""
    out = {w: tokens.mask(slot_mask, index, w) for w in kinds}
    return next(iter(out.values()))[0], {w: m for w, (_, m) in out.items()}


def _prune(prune, weights, x, tokens: _Tokens, cache, num_visual: int, prompt_mask=None):
    """FastV after layer K: ranks the visual tokens by the attention they received in layer K-1
    (``weights`` [B, H, T, S]; with a cache the T columns of the new tokens' slots) from the
    real tokens of ``prompt_mask`` [B, T] (None: every real token) and keeps all but the
    int(ratio x ``num_visual``) least attended (never a ViT sink with ``keep_sinks``;
    debiased first with ``debias``: :func:`pruning.select`).
    x [B, T, D] -> (kept [B, T'] int32 ascending, x [B, T', D], the T' tokens)."""
    received = weights if cache is None else jax.lax.dynamic_slice_in_dim(
        weights, cache.index, x.shape[1], axis=-1)
    kept = pruning.select(prune, received, tokens.attention_mask, prompt_mask, tokens.visual,
                          tokens.sinks, num_visual)
    return kept, pruning.gather_tokens(x, kept), tokens.gather(kept)


def _var_keys(var, cache, tokens: _Tokens):
    """VAR's masks of the S keys: (visual [B, S], ViT sinks [B, S], LLM sinks L x [B, S] int32 or
    None). Without VAR or a cache, the tokens' own (S = T, no per-layer masks); with both, the
    cache's slot masks with the T tokens' written at its index, and with sinks="dims" a list of
    each layer's LLM-sink mask of the cached slots (the layers write theirs in)."""
    if var is None or cache is None:
        return tokens.visual, tokens.sinks, None
    visual, sinks = (jax.lax.dynamic_update_slice(slot, new.astype(slot.dtype), (0, cache.index))
                     for slot, new in ((cache.visual, tokens.visual), (cache.sinks, tokens.sinks)))
    return visual, sinks, None if cache.layer_sinks is None else list(cache.layer_sinks)


def _updated_cache(cache: KVCache, kvs, tokens: _Tokens, slots, late_slots, var_keys) -> KVCache:
    """The cache after a call's T ``tokens``: each layer's (keys, values) from ``kvs``, the slot
    masks ``slots`` [B, S] and ``late_slots`` [B, S - drop] (None without pruning), the next slot
    index + T and the rows' next positions; with VAR ``var_keys`` (:func:`_var_keys`, updated by
    the layers) become its key masks."""
    position = jnp.maximum(cache.position, tokens.next_position()).astype(jnp.int32)
    cache = cache.replace(keys=tuple(k for k, _ in kvs), values=tuple(v for _, v in kvs),
                          mask=slots, index=cache.index + tokens.keep.shape[1],
                          late_mask=late_slots, position=position)
    if var_keys is None:
        return cache
    visual, sinks, layer_sinks = var_keys
    return cache.replace(visual=visual, sinks=sinks,
                         layer_sinks=None if layer_sinks is None else tuple(layer_sinks))


def cache_mask(slot_mask, keep, index, window=None, blocks=None):
    """(updated slot mask [B, S], attention mask [B, 1, T, S]) for T new tokens written at slot
    ``index``: each attends to the kept slots up to its own (and, with a sliding ``window``,
    fewer than ``window`` kept slots back: :func:`window_mask`); with ``blocks`` [B, T] (Gemma 3's image blocks, -1 at
    text) also to the later new tokens of its own image."""
    b, t = keep.shape
    s = slot_mask.shape[1]
    slots = jax.lax.dynamic_update_slice(slot_mask, keep.astype(slot_mask.dtype), (0, index))
    own = (index + jnp.arange(t))[:, None]
    allowed = (jnp.arange(s)[None, :] <= own)[None]
    if blocks is not None:
        key_blocks = jax.lax.dynamic_update_slice(jnp.full((b, s), -1, jnp.int32),
                                                  blocks.astype(jnp.int32), (0, index))
        allowed = allowed | same_block(blocks, key_blocks)
    if window is not None:
        allowed = allowed & window_mask(slots, own[:, 0], s, window)
    return slots, allowed[:, None] & slots.astype(bool)[:, None, None, :]


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


# the LM head's matmul: operands in the compute dtype, products accumulated and returned in
# float32, so the log-softmax of the loss and of scoring reads logits that were never rounded to
# bf16 (a bf16 output has a grid step of 0.125 at logits near 20); in float32 compute it is the
# plain float32 matmul, bit for bit
head_dot_general = partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


class HeadBias(nn.Module):
    """The bias of an LM head whose weight is the tied embedding (``lm_head.bias``)."""

    vocab_size: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, logits):  # [..., V] float32 -> [..., V] float32
        return logits + self.param("bias", nn.initializers.zeros, (self.vocab_size,),
                                   self.param_dtype).astype(jnp.float32)


class CausalLM(nn.Module):
    """``__call__(input_ids [B, T] | inputs_embeds [B, T, D], attention_mask, position_ids)``
    -> CausalLMOutput with float32 logits [B, T, V]: the head multiplies in the compute dtype
    and outputs float32 (:data:`head_dot_general`), in bf16 compute too. ``head_bias``: the LM
    head adds a bias (``lm_head.bias``; also beside tied embeddings); None = the family's
    (``config.lm_head_bias``: PhiForCausalLM's has one)."""

    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False  # remat, attention_impl, scan_layers, remat_policy: see DecoderModel
    attention_impl: str = "xla"
    scan_layers: bool = False
    remat_policy: str = "nothing_saveable"
    head_bias: Optional[bool] = None
    softcap_logits: bool = True  # apply config.final_logit_softcapping (Gemma3ForCausalLM does,
    # Gemma3ForConditionalGeneration does not)

    def setup(self):
        c = self.config
        self.model = DecoderModel(c, self.dtype, self.param_dtype, self.remat,
                                  self.attention_impl, self.scan_layers, self.remat_policy)
        bias = c.lm_head_bias if self.head_bias is None else self.head_bias
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=bias, dtype=self.dtype,
                                    param_dtype=self.param_dtype, dot_general=head_dot_general)
        elif bias:
            self.lm_head = HeadBias(c.vocab_size, self.param_dtype)

    def embed(self, input_ids):
        """input_ids [B, T] -> token embeddings [B, T, D]."""
        return self.model.embed(input_ids)

    def head(self, x):
        """The LM head: hidden states [..., D] (after the final norm) -> float32 logits [..., V]
        (softcapped where the family and ``softcap_logits`` say so)."""
        if self.config.tie_word_embeddings:  # Embed.attend's x @ embedding.T, float32 out
            emb = self.model.embed_tokens.embedding
            logits = head_dot_general(x.astype(self.dtype), emb.astype(self.dtype),
                                      (((x.ndim - 1,), (1,)), ((), ())))
            if hasattr(self, "lm_head"):
                logits = self.lm_head(logits)
        else:
            logits = self.lm_head(x)
        cap = self.config.final_logit_softcapping
        if cap and self.softcap_logits:
            logits = jnp.tanh(logits.astype(jnp.float32) / cap) * cap
        return logits.astype(jnp.float32)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None,
                 inputs_embeds: Optional[jnp.ndarray] = None, output_hidden_states: bool = False,
                 output_attentions: bool = False, cache: Optional[KVCache] = None,
                 head: bool = True, **interventions) -> CausalLMOutput:
        """``interventions``: ``interventions``, ``visual_mask``, ``sink_mask``, ``num_visual``
        as in :class:`DecoderModel` (the LVLM passes them). ``head=False`` skips the LM head:
        ``logits`` None, ``last_hidden_state`` [B, T, D] instead (for a loss that applies
        :meth:`head` a chunk of tokens at a time, never holding [B, T, V] logits)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        if attention_mask is not None and attention_mask.shape != inputs_embeds.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"{tuple(inputs_embeds.shape[:2])} (batch, sequence)")
        x, states, attns, cache = self.model(inputs_embeds, attention_mask, position_ids,
                                             output_attentions, cache, **interventions)
        return CausalLMOutput(logits=self.head(x) if head else None,
                              hidden_states=states if output_hidden_states else None,
                              attentions=attns if output_attentions else None, cache=cache,
                              last_hidden_state=None if head else x)


def _write_llama(config: TextConfig, d: dict) -> None:
    d.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)


registry.register_llm(("llama",), write=_write_llama)
registry.register_llm(("qwen2",))
