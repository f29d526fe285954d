"""Model outputs: pytrees (flax.struct dataclasses) so they pass through jit unchanged."""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
from flax import struct


@struct.dataclass
class VisionOutput:
    last_hidden_state: jnp.ndarray            # [B, N, E] (SigLIP: after post_layernorm)
    pooler_output: Optional[jnp.ndarray]      # [B, E] (CLIP: post-LN CLS, SigLIP: head) or None
    hidden_states: Optional[tuple] = None     # L+1 x [B, N, E], embeddings first (HF order)
    attentions: Optional[tuple] = None        # L x [B, H, N, N] float32
    # the patch grid (rows, columns) where the input size sets it (Qwen2.5-VL); None: the config's
    grid: Optional[tuple] = struct.field(pytree_node=False, default=None)


@struct.dataclass
class KVCache:
    """A preallocated key/value cache of S slots for incremental decoding (rows left-padded)."""

    keys: tuple                               # L x [B, S, K, D]
    values: tuple                             # L x [B, S, K, D]
    mask: jnp.ndarray                         # [B, S] int32: 1 = a token to attend to
    index: jnp.ndarray                        # int32 scalar: the next slot to write
    position: jnp.ndarray                     # [B] int32: the next position id of each row
    # token pruning (FastV): layers >= split hold S - drop slots, with their own slot mask; their
    # next slot is index - drop (the prefill wrote the pruned tokens to the early layers only)
    late_mask: Optional[jnp.ndarray] = None   # [B, S - drop] int32
    drop: int = struct.field(pytree_node=False, default=0)
    # VAR during generation: which slots hold visual tokens / ViT sinks (the keys' masks)
    visual: Optional[jnp.ndarray] = None      # [B, S] int32
    sinks: Optional[jnp.ndarray] = None       # [B, S] int32
    layer_sinks: Optional[tuple] = None       # VAR sinks="dims": L x [B, S] int32, LLM sinks per layer
    split: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class CausalLMOutput:
    logits: Optional[jnp.ndarray]             # [B, T, V] float32 (None with head=False)
    hidden_states: Optional[tuple] = None     # L+1 x [B, T, D]; last one after the final norm
    attentions: Optional[tuple] = None        # L x [B, H, T, T] float32
    cache: Optional[KVCache] = None           # the updated cache when one was passed
    last_hidden_state: Optional[jnp.ndarray] = None  # [B, T, D] after the final norm, in place
                                              # of the logits (head=False)


@struct.dataclass
class VisualArrangement:
    sink_mask: jnp.ndarray      # [N_img, P] bool ViT sinks, stock token order
    permutation: jnp.ndarray    # [N_img, P] int32, new slot j holds stock token permutation[j]
    kept: jnp.ndarray           # [N_img, P] bool in the new order; False = dropped by the selection


@struct.dataclass
class LlavaOutput:
    logits: Optional[jnp.ndarray]             # [B, T, V] float32 (None with head=False)
    hidden_states: Optional[tuple] = None     # LLM hidden states, as CausalLMOutput
    attentions: Optional[tuple] = None        # LLM attention weights, as CausalLMOutput
    image_features: Optional[jnp.ndarray] = None    # [N_img, P, D_llm] projector output, LLM order
    vision_features: Optional[jnp.ndarray] = None   # [N_img, P, E'] the sink features, stock
                                                    # order (LLaVA: the projector input)
    vision_outputs: Optional[Any] = None            # VisionOutput of the tower (all hidden states)
    vision_token_index: Optional[jnp.ndarray] = None  # [N_img, P] int32: the tower token each
                                                      # vision feature is (CLS, registers first)
    visual_arrangement: Optional[VisualArrangement] = None  # set when the policy is not stock
    visual_weights: Optional[jnp.ndarray] = None    # [N_img, 2] DIYSink ReW (w_sink, w_nonsink)
    cache: Optional[KVCache] = None                 # the updated KV cache when one was passed
    last_hidden_state: Optional[jnp.ndarray] = None  # [B, T, D] LLM output after the final norm,
                                                     # in place of the logits (head=False)
