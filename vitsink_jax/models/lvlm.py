"""LLaVA-style LVLM with the semantics of transformers' LlavaForConditionalGeneration:
vision tower -> feature layer(s) and CLS selection -> projector -> written into the positions of
``image_token_index`` in ``input_ids`` (images in order, row-major over the batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..config import LlavaConfig
from .llm import CausalLM
from .outputs import LlavaOutput
from .projector import MLPProjector
from .vit import VisionTransformer


def merge_image_features(inputs_embeds, is_image, image_features):
    """Writes image features into the image-token positions, in order (HF's masked_scatter).

    Args:
      inputs_embeds: [B, T, D] token embeddings.
      is_image: [B, T] bool, True at image-token positions.
      image_features: [M, D] features, M = total image tokens expected.
    Returns:
      ([B, T, D] merged embeddings, count_ok: bool scalar, is_image.sum() == M).
    """
    b, t, d = inputs_embeds.shape
    flat = is_image.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat) - 1, 0, image_features.shape[0] - 1)
    gathered = image_features.astype(inputs_embeds.dtype)[idx]
    merged = jnp.where(flat[:, None], gathered, inputs_embeds.reshape(b * t, d)).reshape(b, t, d)
    return merged, jnp.sum(flat) == image_features.shape[0]


class LlavaForConditionalGeneration(nn.Module):
    """``__call__(input_ids [B, T], pixel_values [N_img, C, H, W], attention_mask [B, T])``
    -> LlavaOutput (float32 logits [B, T, V]).

    The number of image tokens in ``input_ids`` must be ``N_img * config.num_image_tokens``.
    Outside jit a mismatch raises ValueError; under jit (values unknown at trace time) the
    logits are set to NaN so the mismatch can never pass silently.
    """

    config: LlavaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_tower = VisionTransformer(c.vision, **kw)
        self.multi_modal_projector = MLPProjector(c.text.hidden_size, c.projector_type,
                                                  c.projector_hidden_act, c.projector_bias, **kw)
        self.language_model = CausalLM(c.text, **kw)

    def get_image_features(self, pixel_values, output_attentions: bool = False):
        """pixel_values [N, C, H, W] -> (projected [N, P, D], selected [N, P, E'], VisionOutput)."""
        c = self.config
        vout = self.vision_tower(pixel_values, output_hidden_states=True,
                                 output_attentions=output_attentions)
        start = 1 if c.vision_feature_select_strategy == "default" else 0
        selected = jnp.concatenate([vout.hidden_states[i][:, start:] for i in c.feature_layers], -1)
        return self.multi_modal_projector(selected), selected, vout

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                 output_hidden_states: bool = False, output_attentions: bool = False,
                 output_vision: bool = False) -> LlavaOutput:
        c = self.config
        embeds = self.language_model.embed(input_ids)
        feats = selected = vout = None
        if pixel_values is not None:
            feats, selected, vout = self.get_image_features(pixel_values, output_attentions and output_vision)
            is_image = input_ids == c.image_token_index
            expected = feats.shape[0] * feats.shape[1]
            if not isinstance(input_ids, jax.core.Tracer):
                found = int(np.sum(np.asarray(input_ids) == c.image_token_index))
                if found != expected:
                    raise ValueError(f"input_ids contain {found} image tokens (id "
                                     f"{c.image_token_index}) but pixel_values give {feats.shape[0]} "
                                     f"image(s) x {feats.shape[1]} tokens = {expected}")
            embeds, count_ok = merge_image_features(embeds, is_image, feats.reshape(expected, -1))
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=position_ids,
                                  output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions)
        logits = out.logits if pixel_values is None else jnp.where(count_ok, out.logits, jnp.nan)
        return LlavaOutput(logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
                           image_features=feats if output_vision else None,
                           vision_features=selected if output_vision else None,
                           vision_outputs=vout if output_vision else None)
