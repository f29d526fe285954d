"""Which ViT sinks a visual-token reduction keeps: the harness' "ViT sinks kept" column.

The paper's Finding 5 says ViT sinks carry the image's global information; a pruning method
keeps or drops them for reasons of its own. Per image, the share of its ViT sinks (the model's
sink rule on the projector input, :meth:`~vitsink_jax.models.lvlm.LlavaForConditionalGeneration.
visual_sinks`) among the ViT positions the method keeps, averaged over the images with at least
one sink.

N images (one per row), P visual tokens per image, k kept.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import Interventions, pruning, reduction


def sink_share_kept(kept, sinks) -> Optional[float]:
    """The share of each image's ViT sinks that a method keeps, averaged over the images.

    Args:
      kept: int32 [N, k] the ViT positions (0..P-1) each image keeps, any order (a method
        that keeps every token: arange(P)); -1 for a slot that holds no single ViT token (a
        merged token: VisionZip's contextual ones, PruMerge's appended one and unused slots),
        which keeps no sink; sinks: bool [N, P] the image's ViT sinks.
    Returns:
      mean over the images with >= 1 sink of |kept & sinks| / |sinks|; None when no image has a
      sink.
    """
    kept, sinks = np.asarray(kept), np.asarray(sinks, bool)
    if kept.ndim != 2 or sinks.ndim != 2 or kept.shape[0] != sinks.shape[0]:
        raise ValueError(f"sink share: kept positions {kept.shape} [N, k] and sinks {sinks.shape} "
                         "[N, P] need one row per image")
    n, p = sinks.shape
    if kept.size and (kept.min() < -1 or kept.max() >= p):
        raise ValueError(f"sink share: kept positions outside [0, {p}) (or -1: no single ViT token)")
    hit = np.zeros((n, p + 1), bool)  # column p: the slots that hold no single ViT token
    np.put_along_axis(hit, np.where(kept < 0, p, kept).astype(np.int64), True, axis=1)
    hit = hit[:, :p]
    count = sinks.sum(1)
    shares = (hit & sinks).sum(1)[count > 0] / count[count > 0]
    return float(shares.mean()) if shares.size else None


def vit_positions(kept, visual, count: int, permutation=None):
    """FastV's kept sequence indices -> the ViT positions they hold.

    Args:
      kept: int32 [B, T'] kept sequence indices (:func:`pruning.select`); visual: bool [B, T]
        the visual-token slots (one image per row); count: static, the visual tokens kept per
        row; permutation: int [B, P] the visual arrangement (slot j holds ViT token
        permutation[j]: sink-to-the-front) or None (slots in ViT order).
    Returns:
      int32 [B, count] ViT positions, ascending in slot order.
    """
    index = pruning.visual_index(visual)
    at = jnp.take_along_axis(index, kept, axis=1)                          # [B, T'] slot or -1
    slots = jnp.sort(jnp.where(at >= 0, at, jnp.iinfo(jnp.int32).max), axis=1)[:, :count]
    if permutation is not None:
        slots = jnp.take_along_axis(permutation, slots, axis=1)
    return slots.astype(jnp.int32)


def tower_to_vit(tower, index):
    """A token reduction's kept tower positions -> the ViT positions they hold.

    Args:
      tower: int32 [N, k] positions in the tower's token sequence
        (:func:`~vitsink_jax.interventions.reduction.kept_positions`; -1: no single ViT token);
      index: int32 [N, P] the tower position of each ViT position (the projector's input:
        ``LlavaOutput.vision_token_index``).
    Returns:
      int32 [N, k] ViT positions (0..P-1), -1 where the slot holds none of them.
    """
    match = tower[:, :, None] == index[:, None, :]                          # [N, k, P]
    return jnp.where(match.any(-1), jnp.argmax(match, -1), -1).astype(jnp.int32)


def kept_positions(model) -> Callable:
    """The ViT positions ``model`` (an LVLM with its interventions) keeps per image, with the
    images' ViT sinks: a jitted ``(params, batch) -> (kept int32 [N, k], sinks bool [N, P])``
    running one forward over ``batch`` (eval_lib.prompt_batch's ids, mask, pixels, question;
    prompt-only rows: every real token votes, as in generation's prefill; N = B, one image
    per row). FastV (``interventions.prune``) is reproduced outside the model from the
    attention of layer K-1 of the forward without pruning (layers < K are the same with it)
    and the same :func:`pruning.select`; a token reduction before the LLM
    (``interventions.reduce``) gives its own (:func:`~vitsink_jax.interventions.reduction.
    kept_positions`, merged tokens keeping none); every other intervention keeps all P tokens."""
    prune, reduce = model.interventions.prune, model.interventions.reduce
    plain = model.clone(interventions=Interventions(var=model.interventions.var,
                                                    registers=model.interventions.registers))

    @jax.jit
    def run(params, ids, pixels, mask, question):
        out = plain.apply({"params": params}, ids, pixels, attention_mask=mask,
                          question_mask=question, output_vision=True,
                          output_attentions=prune is not None)
        sinks = model.visual_sinks(out.vision_features)                   # [N, P], ViT order
        n, p = sinks.shape
        if reduce is not None:
            tower = reduction.kept_positions(model, params, pixels)        # [N, k] tower positions
            return tower_to_vit(tower, out.vision_token_index), sinks
        if prune is None:
            return jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (n, p)), sinks
        visual = ids == model.config.image_token_index
        inputs = model.intervention_inputs(out.vision_features, out.visual_arrangement, visual)
        kept = pruning.select(prune, out.attentions[prune.layer - 1], mask, None, visual,
                              inputs["sink_mask"], p)
        arrangement = out.visual_arrangement
        return vit_positions(kept, visual, p - prune.dropped(p),
                             None if arrangement is None else arrangement.permutation), sinks

    def positions(params, batch: dict):
        question = batch.get("question")
        kept, sinks = run(params, jnp.asarray(batch["ids"]), jnp.asarray(batch["pixels"]),
                          jnp.asarray(batch["mask"]), None if question is None else jnp.asarray(question))
        return np.asarray(kept), np.asarray(sinks)

    return positions


def sink_share(params, batches, positions: Callable) -> Optional[float]:
    """:func:`sink_share_kept` over the images of ``batches`` (eval_lib.prompt_batch dicts).
    ``positions(params, batch) -> (kept int32 [N, k], sinks bool [N, P])``: the method's kept
    ViT positions and the images' sinks (:func:`kept_positions` of the model for FastV and the
    keep-all interventions; a pre-LLM method passes its own)."""
    kept, sinks = zip(*(positions(params, b) for b in batches))
    return sink_share_kept(np.concatenate(kept), np.concatenate(sinks))
