"""VAR, visual attention redistribution (Kang et al., ICLR 2025), as a pure function on one
layer's attention probabilities. B batch, H heads, T queries, S keys.

Rules (the official code's, MICV-yonsei/VisAttnSink src/logic/logic.py; defaults in
:class:`~vitsink_jax.interventions.AttentionRedistribution`): for each (row, head, query) the
visual attention is a = sum over visual keys and the visual-sink share is s = (attention to
visual sink keys) / a. The head is image-centric for that query when s <= rho and a >= summ.
There the attention to every sink key (visual or text, BOS included) is multiplied by p and the
freed budget (1 - p) x (its attention to sinks) is added to the non-sink visual keys in
proportion to their attention, so each row still sums to 1. Only the ``queries`` given change
(the official code: in a prefill the queries after the image, while decoding every query), and
with ``visual_sink_required`` a row whose keys hold no visual sink is left alone (the official
code skips such a layer).
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from ..sinks.detect import massive_activation_dims


def image_centric(weights, visual, sinks, rho: float, summ: float):
    """[B, H, T] bool: the (row, head, query) triples VAR modifies.
    weights [B, H, T, S]; visual, sinks [B, S] bool."""
    chex.assert_rank(weights, 4)
    w = weights.astype(jnp.float32)
    a = jnp.einsum("bhts,bs->bht", w, visual.astype(jnp.float32))
    vs = jnp.einsum("bhts,bs->bht", w, (visual & sinks).astype(jnp.float32))
    return (vs / (a + 1e-6) <= rho) & (a >= summ)


def redistribute(weights, visual, sinks, p: float, rho: float, summ: float, queries=None,
                 visual_sink_required: bool = False):
    """VAR on attention probabilities [B, H, T, S] -> the same shape (p = 1: unchanged).
    visual, sinks [B, S] bool: the keys' visual slots and sinks; queries [B, T] bool: the queries
    VAR may change (None: all); visual_sink_required: rows without a visual sink key stay."""
    chex.assert_equal_shape([visual, sinks])
    w = weights.astype(jnp.float32)
    heads = image_centric(w, visual, sinks, rho, summ)
    if queries is not None:
        heads = heads & queries[:, None, :]
    if visual_sink_required:
        heads = heads & jnp.any(visual & sinks, axis=-1)[:, None, None]
    sink = sinks[:, None, None, :]
    budget = (1.0 - p) * jnp.sum(jnp.where(sink, w, 0.0), axis=-1, keepdims=True)
    reduced = jnp.where(sink, w * p, w)
    target = jnp.where((visual & ~sinks)[:, None, None, :], reduced, 0.0)
    ratios = target / (jnp.sum(target, axis=-1, keepdims=True) + 1e-8)
    out = jnp.where(heads[..., None], reduced + budget * ratios, w)
    return out.astype(weights.dtype)


def queries_after_visual(visual):
    """[B, T] bool: the tokens after the row's last visual token (VAR's prefill queries); every
    token of a row without one (a decoding step's new tokens). visual [B, T] bool."""
    t = visual.shape[1]
    last = jnp.max(jnp.where(visual, jnp.arange(t)[None], -1), axis=1, keepdims=True)
    return jnp.arange(t)[None] > last


def llm_sink_dims(model, params, batch: dict) -> tuple:
    """VAR's sink dimensions of an LVLM's LLM found on ``batch`` (eval_lib.prompt_batch's ids,
    mask [B, T] and pixels): the dimensions of massive activations
    (:func:`~vitsink_jax.sinks.detect.massive_activation_dims`) at the text tokens of the middle
    layer's input, as the analysis finds them; () when there are none. The official code ships
    them per model (LLaVA-1.5-7B: (2533, 1415), 13B: (2100, 4743))."""
    ids, mask = jnp.asarray(batch["ids"]), jnp.asarray(batch["mask"])
    out = model.apply({"params": params}, ids, jnp.asarray(batch["pixels"]), attention_mask=mask,
                      output_hidden_states=True)
    hidden = out.hidden_states[(len(out.hidden_states) - 1) // 2]
    text = mask.astype(bool) & (ids != model.config.image_token_index)
    return tuple(int(d) for d in massive_activation_dims(hidden, text) if d >= 0)
