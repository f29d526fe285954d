"""Gemma 3 LVLM with the semantics of transformers' Gemma3ForConditionalGeneration: SigLIP ->
average pool -> soft-embedding norm -> linear -> Gemma 3 LLM (:mod:`vitsink_jax.models.gemma`),
with the tokens of each image attending to each other bidirectionally.

Everything else (sink-to-the-front, DIYSink, the interventions, the KV cache) is the LLaVA
composition's (:class:`~vitsink_jax.models.lvlm.LlavaForConditionalGeneration`); this module
only supplies what differs: the projector, the tokens the sink rule reads and the image blocks.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from ..config import Gemma3Config
from .layers import RMSNorm
from .lvlm import LlavaForConditionalGeneration
from .merge import MergedTokens, check_type_ids


class Gemma3Projector(nn.Module):
    """Gemma3MultiModalProjector after the pooling: (1 + w) RMSNorm ``mm_soft_emb_norm`` then
    ``x @ mm_input_projection_weight`` ([E, D], stored as transformers stores it)."""

    out_features: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # pooled tokens [..., E] -> [..., D]
        w = self.param("mm_input_projection_weight", nn.initializers.lecun_normal(),
                       (x.shape[-1], self.out_features), self.param_dtype)
        x = RMSNorm(self.eps, self.dtype, self.param_dtype, offset=True, name="mm_soft_emb_norm")(x)
        return x @ w.astype(self.dtype)


def image_blocks(input_ids, image_token_index: int):
    """input_ids [B, T] -> [B, T] int32: each run of consecutive image tokens numbered from 0 per
    row, -1 elsewhere (transformers' block ids from token_type_ids)."""
    is_image = input_ids == image_token_index
    start = is_image & ~jnp.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(is_image, jnp.cumsum(start, axis=1) - 1, -1).astype(jnp.int32)


class Gemma3ForConditionalGeneration(MergedTokens, LlavaForConditionalGeneration):
    """Same call as :class:`LlavaForConditionalGeneration` (inputs, policy, interventions,
    cache); ``config`` is a :class:`~vitsink_jax.config.Gemma3Config`. ``vision_features`` in
    the output are, per visual token, the largest-norm ViT token of its pooling window before
    the tower's post-LayerNorm (see Gemma3Config); ``vision_token_index`` says which."""

    config: Gemma3Config

    def new_projector(self) -> nn.Module:
        c = self.config
        return Gemma3Projector(c.text.hidden_size, c.vision.layer_norm_eps, self.dtype, self.param_dtype)

    def __call__(self, input_ids, pixel_values=None, *args, token_type_ids=None, **kwargs):
        """:meth:`LlavaForConditionalGeneration.__call__`, also taking Gemma3Processor's
        ``token_type_ids`` [B, T] (1 on image tokens): the bidirectional image blocks are read
        from the image tokens of input_ids, which they must agree with."""
        check_type_ids("token_type_ids", token_type_ids, input_ids, self.config.image_token_index)
        return super().__call__(input_ids, pixel_values, *args, **kwargs)

    def sink_tokens(self, vout):
        """The last layer's tokens before the tower's post-LayerNorm."""
        return vout.hidden_states[-1]

    def projector_input(self, selected, vout):
        del selected
        return self._windows(vout.last_hidden_state, vout).mean(axis=2)

    def llm_inputs(self, input_ids) -> dict:
        return {"image_blocks": image_blocks(input_ids, self.config.image_token_index)}
