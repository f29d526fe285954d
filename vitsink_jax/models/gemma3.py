"""Gemma 3 LVLM with the semantics of transformers' Gemma3ForConditionalGeneration: SigLIP ->
average pool -> soft-embedding norm -> linear -> Gemma 3 LLM (:mod:`vitsink_jax.models.gemma`),
with the tokens of each image attending to each other bidirectionally.

Everything else (sink-to-the-front, DIYSink, the interventions, the KV cache) is the LLaVA
composition's (:class:`~vitsink_jax.models.lvlm.LlavaForConditionalGeneration`); this module
only supplies what differs: the projector, the tokens the sink rule reads and the image blocks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import ClassVar

import jax.numpy as jnp
from flax import linen as nn

from ..config import FeatureLayer, MergedTokensConfig, diysink_of
from . import registry
from .layers import RMSNorm
from .lvlm import LlavaForConditionalGeneration
from .merge import MergedTokens, check_type_ids


@dataclasses.dataclass(frozen=True)
class Gemma3Config(MergedTokensConfig):
    """Gemma 3 (transformers' Gemma3ForConditionalGeneration): SigLIP tower -> its last state
    after the post-LayerNorm -> k x k average pool down to ``mm_tokens_per_image`` tokens ->
    (1 + w) RMSNorm -> one matrix -> Gemma 3 LLM. The processor wraps each image's tokens in
    ``boi_token_index`` / ``eoi_token_index`` and they attend to each other bidirectionally.

    Sinks (``vision_features``): the norms are read on the ViT tokens before the post-LayerNorm
    (which rescales every token to about the same norm), and each of the
    ``mm_tokens_per_image`` visual tokens carries the largest-norm ViT token of its k x k
    pooling window, so a visual token is a sink under the threshold rule exactly when it holds a
    ViT sink. The LLaVA fields for the projector and feature selection do not apply.
    """

    model_type: ClassVar[str] = "gemma3"
    side_by_side: ClassVar[bool] = False
    image_token_index: int = 262144
    projector_type: str = "gemma3"
    vision_feature_layer: FeatureLayer = -1
    vision_feature_select_strategy: str = "full"
    mm_tokens_per_image: int = 256
    boi_token_index: int = 255999
    eoi_token_index: int = 256000

    def __post_init__(self):
        side = math.isqrt(self.mm_tokens_per_image)
        if self.vision.model_type != "siglip_vision_model":
            raise ValueError(f"Gemma 3's tower is SigLIP, not {self.vision.model_type}")
        if self.text.model_type != "gemma3_text":
            raise ValueError(f"Gemma 3's LLM is gemma3_text, not {self.text.model_type}")
        if side * side != self.mm_tokens_per_image or self.vision.grid_size % side:
            raise ValueError(f"mm_tokens_per_image {self.mm_tokens_per_image} must be a square whose "
                             f"side divides the tower's {self.vision.grid_size} patches per side")
        if self.image_size or self.projector_type != "gemma3" or self.vision_feature_layer != -1 or \
                self.vision_feature_select_strategy != "full":
            raise ValueError("Gemma 3 has its own projector, feature selection and input size")

    @property
    def token_grid(self) -> int:
        """Visual tokens per side (after pooling)."""
        return math.isqrt(self.mm_tokens_per_image)

    @property
    def pool(self) -> int:
        """Side k of the k x k windows of ViT patches pooled into one visual token."""
        return self.vision.grid_size // self.token_grid

    @classmethod
    def from_hf(cls, d: dict) -> "Gemma3Config":
        vision, text = cls.read_parts(d, "siglip_vision_model", "gemma3_text")
        return cls(vision=vision, text=text,
                   image_token_index=d.get("image_token_index", d.get("image_token_id", 262144)),
                   mm_tokens_per_image=d.get("mm_tokens_per_image", 256),
                   boi_token_index=d.get("boi_token_index", 255999),
                   eoi_token_index=d.get("eoi_token_index", 256000),
                   diysink=diysink_of(d),
                   hf_json=json.dumps(d))

    def to_hf(self) -> dict:
        d = json.loads(self.hf_json)
        d.update(model_type="gemma3", vision_config=self.vision.to_hf(), text_config=self.text.to_hf(),
                 image_token_index=self.image_token_index, mm_tokens_per_image=self.mm_tokens_per_image,
                 boi_token_index=self.boi_token_index, eoi_token_index=self.eoi_token_index,
                 tie_word_embeddings=self.text.tie_word_embeddings)
        return self._with_diysink(d, "Gemma3ForConditionalGeneration")


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
    cache); ``config`` is a :class:`Gemma3Config`. ``vision_features`` in
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


registry.register_lvlm("gemma3", Gemma3Config, Gemma3ForConditionalGeneration)
