"""InternVL LVLM with the semantics of transformers' InternVLForConditionalGeneration: InternViT
(:mod:`vitsink_jax.models.internvit`) -> pixel shuffle -> LayerNorm + MLP -> the LLM (Qwen2 or
LLaMA, :mod:`vitsink_jax.models.llm`). Each tile of an image is one image to the model.

Everything else (sink-to-the-front, DIYSink, the interventions, the KV cache) is the LLaVA
composition's; this module only supplies the projector, the pixel shuffle and the tokens the
sink rule reads (:class:`~vitsink_jax.models.merge.MergedTokens`).
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from typing import ClassVar

import jax.numpy as jnp
from flax import linen as nn

from ..config import FeatureLayer, MergedTokensConfig, diysink_of
from . import registry
from .layers import activation
from .lvlm import LlavaForConditionalGeneration
from .merge import MergedTokens


@dataclasses.dataclass(frozen=True)
class InternVLConfig(MergedTokensConfig):
    """InternVL (transformers' InternVLForConditionalGeneration): InternViT -> the
    ``vision_feature_layer`` tokens without CLS -> pixel shuffle (each 1 / ``downsample_ratio``
    square window of patches becomes one token with their channels side by side) -> LayerNorm +
    two-layer MLP -> the LLM (Qwen2 or LLaMA). Each tile of an image (448 px crops and a
    thumbnail, :func:`vitsink_jax.data.preprocess.preprocess_internvl`) is one image to the
    model (so DIYSink's ReW and token pruning, which need one image per row, need one tile).

    Sinks (``vision_features``): read on the ViT tokens of the feature layer, before the pixel
    shuffle; each visual token carries the largest-norm ViT token of its window."""

    model_type: ClassVar[str] = "internvl"
    image_token_index: int = 151667
    projector_type: str = "internvl"
    vision_feature_layer: FeatureLayer = -1
    downsample_ratio: float = 0.5

    def __post_init__(self):
        if not self.vision.is_internvit:
            raise ValueError(f"InternVL's tower is internvl_vision, not {self.vision.model_type}")
        k = 1 / self.downsample_ratio
        if k != round(k) or self.vision.grid_size % round(k):
            raise ValueError(f"downsample_ratio {self.downsample_ratio}: 1 / ratio must be a whole "
                             f"number dividing the tower's {self.vision.grid_size} patches per side")
        if self.image_size or self.projector_type != "internvl" or \
                self.vision_feature_select_strategy != "default" or not isinstance(self.vision_feature_layer, int):
            raise ValueError("InternVL has its own projector and input size, drops the CLS token "
                             "(vision_feature_select_strategy 'default') and reads one feature layer")

    @property
    def pool(self) -> int:
        return round(1 / self.downsample_ratio)

    @property
    def token_grid(self) -> int:
        return self.vision.grid_size // self.pool

    @classmethod
    def from_hf(cls, d: dict) -> "InternVLConfig":
        vision, text = cls.read_parts(d, "internvl_vision", "qwen2")
        config = cls(vision=vision, text=text,
                     image_token_index=d.get("image_token_id", d.get("image_token_index", 151667)),
                     projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                     vision_feature_layer=d.get("vision_feature_layer", -1),
                     vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
                     downsample_ratio=float(d.get("downsample_ratio", 0.5)),
                     diysink=diysink_of(d),
                     hf_json=json.dumps(d))
        seq = d.get("image_seq_length", config.num_image_tokens)
        if seq != config.num_image_tokens:
            raise ValueError(f"image_seq_length {seq} is not the {config.num_image_tokens} tokens the "
                             f"tower's {vision.grid_size}-patch grid gives at downsample_ratio "
                             f"{config.downsample_ratio}")
        return config

    def to_hf(self) -> dict:
        d = json.loads(self.hf_json)
        d.update(model_type="internvl", vision_config=self.vision.to_hf(), text_config=self.text.to_hf(),
                 image_token_id=self.image_token_index, image_seq_length=self.num_image_tokens,
                 downsample_ratio=self.downsample_ratio, projector_hidden_act=self.projector_hidden_act,
                 vision_feature_layer=self.vision_feature_layer,
                 vision_feature_select_strategy=self.vision_feature_select_strategy,
                 tie_word_embeddings=self.text.tie_word_embeddings)
        return self._with_diysink(d, "InternVLForConditionalGeneration")


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
    tiles of every image in order); ``config`` is an :class:`InternVLConfig`."""

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


registry.register_lvlm("internvl", InternVLConfig, InternVLForConditionalGeneration)
