"""Greedy generation for the LVLM, jitted end to end with static shapes.

This is the reference decoder used by the evaluation harness for free-form answers: every step
re-runs the full (left-padded) sequence, so its cost is ``max_new_tokens`` forwards; a KV-cache
decoder is the fast-inference issue's job and must match this one token for token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def left_pad(rows: list, length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts (1-D int arrays) -> (ids [B, length] int32 left-padded, mask [B, length] int32)."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"prompt {i} has {len(r)} tokens, more than the padded length {length}")
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def greedy_generate(model, params, input_ids, attention_mask, pixel_values, max_new_tokens: int,
                    eos_token_id: int = -1):
    """Greedy decoding (jit-able; ``model`` and ``max_new_tokens`` static).

    Args:
      input_ids: [B, T] left-padded prompts; attention_mask: [B, T] 1 = token.
      pixel_values: [N_img, C, H, W] images of the prompts, in order.
    Returns:
      [B, max_new_tokens] int32 new tokens; after ``eos_token_id`` a row repeats eos.
    """
    b, t = input_ids.shape
    n = max_new_tokens
    ids = jnp.concatenate([input_ids, jnp.zeros((b, n), input_ids.dtype)], axis=1)
    mask = jnp.concatenate([attention_mask, jnp.zeros((b, n), attention_mask.dtype)], axis=1)

    def step(i, state):
        ids, mask, done = state
        pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits = model.apply({"params": params}, ids, pixel_values, attention_mask=mask,
                             position_ids=pos).logits
        nxt = jnp.argmax(logits[:, t - 1 + i], axis=-1).astype(ids.dtype)
        nxt = jnp.where(done, eos_token_id, nxt)
        ids = ids.at[:, t + i].set(nxt)
        mask = mask.at[:, t + i].set(1)
        return ids, mask, done | (nxt == eos_token_id)

    ids, _, _ = jax.lax.fori_loop(0, n, step, (ids, mask, jnp.zeros((b,), bool)))
    return ids[:, t:]
