"""Generation for the LVLM: one prefill over the prompt (images included) into a preallocated
KV cache, then a compiled decode loop (``lax.while_loop``, one token per iteration, no Python
dispatch per token) that stops when every row has hit a stop token or ``max_new_tokens``.
With FastV token pruning the layers after K cache only the kept tokens, so decode steps read a
shorter cache there.

Greedy (``temperature=0``) or sampling with temperature, top-k and top-p under an explicit
PRNG key. Prompts are left-padded; pad them to a length bucket (:func:`vitsink_jax.data.padding.left_pad`) so that prompts of
different lengths share one compiled program. Visual-token policies (sink-to-the-front, token
selection) and the DIYSink projector apply in the prefill like in a plain forward.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .models.llm import init_cache, unstack_layers


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Logits [B, V] -> logits for sampling: divided by the temperature, everything outside the
    top-k and outside the smallest set with probability >= top_p set to -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep tokens whose preceding mass is < top_p (the most likely token always stays)
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx[:, None] - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def next_token(logits, key, temperature: float, top_k: int, top_p: float):
    """Greedy when ``temperature == 0``, else a sample from the filtered distribution."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def prefill(model, params, input_ids, attention_mask, pixel_values, max_new_tokens: int, route=None,
            question_mask=None):
    """The prompt's forward into a fresh cache of T + ``max_new_tokens`` slots -> LlavaOutput
    (``.cache`` prefilled). With FastV pruning the layers after K get the shorter cache.
    ``route`` [N_img] and ``question_mask`` [B, T] (DIYSink ReW) as in the model's forward."""
    b, t = input_ids.shape
    prune = model.interventions.prune
    per_image = model.config.num_image_tokens if pixel_values is None else model.tokens_per_image(pixel_values.shape)
    pruning = () if prune is None else (prune.layer, prune.dropped(per_image))
    var = model.interventions.var
    cache = init_cache(model.config.text, b, t + max_new_tokens, model.dtype, pruning,
                       var=None if var is None else var.sinks)
    return model.apply({"params": params}, input_ids, pixel_values, attention_mask=attention_mask,
                       cache=cache, route=route, question_mask=question_mask)


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "stop_ids", "temperature", "top_k",
                                   "top_p"))
def generate(model, params, input_ids, attention_mask, pixel_values, max_new_tokens: int,
             stop_ids: tuple = (), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             key=None, route=None, question_mask=None):
    """New tokens for a batch of left-padded prompts.

    Args:
      model: an LlavaForConditionalGeneration (its visual-token policy applies in the prefill);
        with ``scan_layers`` the params are unstacked once per call and the loop layout runs.
      input_ids, attention_mask: [B, T] left-padded prompts; pixel_values: [N_img, C, H, W].
      stop_ids: token ids that end a row (the stop token is kept, later ones are ``stop_ids[0]``).
      key: PRNG key for sampling (``temperature > 0``); route: [N_img] optional token selection.
      question_mask: [B, T] bool left-padded like the ids, the question tokens (needed by a
        DIYSink ReW model; see ``eval_lib.encode_question_prompt``).
    Returns:
      [B, max_new_tokens] int32.
    """
    b, _ = input_ids.shape
    if model.scan_layers:  # the KV cache addresses single layers
        model, params = model.clone(scan_layers=False), unstack_layers(params)
    key = jax.random.PRNGKey(0) if key is None else key
    out = prefill(model, params, input_ids, attention_mask, pixel_values, max_new_tokens, route,
                  question_mask)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    fill = stops[0]
    first = next_token(out.logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k, top_p)
    tokens = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stops)

    def cond(state):
        i, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, cache, done = state
        last = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
        step = model.apply({"params": params}, last, cache, method=type(model).decode)
        tok = next_token(step.logits[:, -1], jax.random.fold_in(key, i), temperature, top_k, top_p)
        tok = jnp.where(done, fill, tok)
        return i + 1, tokens.at[:, i].set(tok), step.cache, done | jnp.isin(tok, stops)

    _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.asarray(1), tokens, out.cache, done))
    return tokens
