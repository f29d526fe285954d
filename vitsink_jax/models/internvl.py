"""InternVL LVLM with the semantics of transformers' InternVLForConditionalGeneration: InternViT
(:mod:`vitsink_jax.models.internvit`) -> pixel shuffle -> LayerNorm + MLP -> the LLM (Qwen2 or
LLaMA, :mod:`vitsink_jax.models.llm`). Each tile of an image is one image to the model.

Everything else (sink-to-the-front, DIYSink, the interventions, the KV cache) is the LLaVA
composition's; this module only supplies the projector, the pixel shuffle and the tokens the
sink rule reads (:class:`~vitsink_jax.models.merge.MergedTokens`).
"""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp
from flax import linen as nn

from ..config import InternVLConfig
from .layers import activation
from .lvlm import LlavaForConditionalGeneration
from .merge import MergedTokens


def pixel_shuffle(tokens, side: int, ratio: float):
    """ViT patch tokens [N, side ** 2, C] (row-major) -> [N, (side ratio) ** 2, C / ratio ** 2]:
    transformers' InternVL pixel shuffle, step by step (each 1 / ratio square window of patches
    becomes one token, row-major over the windows)."""
    n, _, c = tokens.shape
    half, cells = int(side * ratio), int(c / ratio)
    x = tokens.reshape(n, side, half, cells).transpose(0, 2, 1, 3)
    x = x.reshape(n, half, half, int(c / ratio ** 2)).transpose(0, 2, 1, 3)
    return x.reshape(n, half * half, -1)


class InternVLProjector(nn.Module):
    """InternVLMultiModalProjector: ``layer_norm`` -> ``linear_1`` -> act -> ``linear_2``."""

    out_features: int
    act: str = "gelu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # shuffled tokens [..., C / ratio ** 2] -> [..., D]
        dense = partial(nn.Dense, self.out_features, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="layer_norm")(x)
        return dense(name="linear_2")(activation(self.act)(dense(name="linear_1")(x)))


class InternVLForConditionalGeneration(MergedTokens, LlavaForConditionalGeneration):
    """Same call as :class:`LlavaForConditionalGeneration` (pixel_values [N_tiles, C, H, W]: the
    tiles of every image in order); ``config`` is an :class:`~vitsink_jax.config.InternVLConfig`."""

    config: InternVLConfig

    def new_projector(self) -> nn.Module:
        c = self.config
        return InternVLProjector(c.text.hidden_size, c.projector_hidden_act, self.dtype, self.param_dtype)

    def sink_tokens(self, vout):
        """The feature layer's patch tokens (no CLS), before a final LayerNorm."""
        return vout.hidden_states[self.config.vision_feature_layer][:, 1:]

    def projector_input(self, selected, vout):
        del selected
        c = self.config
        feats = vout.last_hidden_state if c.vision_feature_layer == -1 else \
            vout.hidden_states[c.vision_feature_layer]
        return pixel_shuffle(feats[:, 1:], c.vision.grid_size, c.downsample_ratio)
