"""LLaVA-style LVLM with the semantics of transformers' LlavaForConditionalGeneration:
vision tower -> feature layer(s) and CLS selection -> projector -> written into the positions of
``image_token_index`` in ``input_ids`` (images in order, row-major over the batch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..config import LlavaConfig
from ..sinks.detect import SinkRule, sink_mask, token_norms
from ..sinks.fuse import (VisualTokenPolicy, arrange_visual_tokens, permute_tokens, route_codes_ok,
                          shift_positions)
from .llm import CausalLM, generation_positions
from .outputs import LlavaOutput, VisualArrangement
from .projector import MLPProjector, Reweighter
from . import registry
from ..interventions import Interventions, reduction
from ..interventions.pruning import gather_tokens


def merge_image_features(inputs_embeds, is_image, image_features, expected=None,
                         per_row: bool = False, has_image=None):
    """Writes image features into the image-token positions, in order (HF's masked_scatter).

    Args:
      inputs_embeds: [B, T, D] token embeddings.
      is_image: [B, T] bool, True at image-token positions.
      image_features: [M, D] features, M = total image tokens expected; with ``per_row``
        [B, P, D], row b's own image (one image per row): each row gathers from its own
        features only, so rows split over devices need no other device's features (the flat
        gather makes XLA gather every row's features of the whole batch on every device).
      expected: int scalar, the image tokens to write when fewer than M (the first ``expected``
        features; the rest belong to the blank images of text-only rows); default M.
      has_image: with ``per_row``, [B] bool: False for a text-only row (no image tokens).
    Returns:
      ([B, T, D] merged embeddings, count_ok: bool scalar, is_image.sum() == expected; with
      ``per_row``, every row holds P image tokens, or none where ``has_image`` is False).
    """
    if per_row:
        p = image_features.shape[1]
        idx = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, p - 1)
        gathered = jnp.take_along_axis(image_features.astype(inputs_embeds.dtype), idx[..., None], axis=1)
        want = p if has_image is None else p * has_image.astype(jnp.int32)
        return (jnp.where(is_image[..., None], gathered, inputs_embeds),
                jnp.all(jnp.sum(is_image, axis=1) == want))
    b, t, d = inputs_embeds.shape
    flat = is_image.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat) - 1, 0, image_features.shape[0] - 1)
    gathered = image_features.astype(inputs_embeds.dtype)[idx]
    merged = jnp.where(flat[:, None], gathered, inputs_embeds.reshape(b * t, d)).reshape(b, t, d)
    return merged, jnp.sum(flat) == (image_features.shape[0] if expected is None else expected)


def images_first(has_image, *trees):
    """``trees`` (arrays or pytrees with a leading [N_img] axis) with the images of
    ``has_image`` [N_img] bool moved to the front in order (the others after them), so the
    first ``sum(has_image)`` images are the ones whose tokens the rows hold. jit-able."""
    order = jnp.argsort(~has_image, stable=True)
    return tuple(jax.tree_util.tree_map(lambda x: x[order], t) for t in trees)


def arranged_positions(position_ids, is_image, arrangement: VisualArrangement, mode: str):
    """LLM position ids after the visual tokens were rearranged.

    Args:
      position_ids: [B, T] positions of the stock model, or [B, T, 3] multimodal ids.
      is_image: [B, T] bool image-token slots (images in order, row-major over the batch).
      arrangement: the permutation and keep-mask of each image ([N_img, P]).
      mode: "sequential" (positions follow the new order: 1-D ids close the gap of dropped tokens;
        multimodal ids: the kept tokens take the image's ids in raster order, the text after keeps
        its own) or "original" (each visual token takes the ids its source token had in the stock
        model).
    Returns:
      (position_ids of the input's shape, int32; dropped [B, T] bool: slots holding a dropped token).
    """
    b, t = is_image.shape
    n, p = arrangement.permutation.shape
    flat = is_image.reshape(-1)
    m = jnp.clip(jnp.cumsum(flat) - 1, 0, n * p - 1)              # image-token index of each slot
    dropped = (flat & ~arrangement.kept.reshape(-1)[m]).reshape(b, t)
    if mode == "sequential" and position_ids.ndim == 2:
        return shift_positions(position_ids, dropped), dropped
    if mode == "sequential":  # the r-th kept token of an image takes the image's r-th slot's ids
        rank = jnp.cumsum(arrangement.kept, axis=1) - 1
        src = (jnp.maximum(rank, 0) + p * jnp.arange(n)[:, None]).reshape(-1)
    else:
        src = (arrangement.permutation + p * jnp.arange(n)[:, None]).reshape(-1)  # source token per index
    slots = jnp.nonzero(flat, size=n * p, fill_value=0)[0]                     # slot of each index
    base = position_ids.reshape((b * t,) + position_ids.shape[2:])
    pick = flat.reshape((-1,) + (1,) * (position_ids.ndim - 2))
    moved = jnp.where(pick, base[slots[src[m]]], base).reshape(position_ids.shape)
    return moved.astype(jnp.int32), dropped


QUESTION_ENCODERS = {}  # name -> fn(embeds [B, T, D], input_ids [B, T], mask [B, T]) -> [B, Q]


def register_question_encoder(name: str):
    """Decorator: makes a question encoder available to DIYSink's ReW under ``name``
    (``DIYSinkConfig.question_encoder``). It must be a jit-able function of the input embeddings,
    ids and question mask of a batch; its output is treated as frozen."""
    def add(fn):
        QUESTION_ENCODERS[name] = fn
        return fn
    return add


@register_question_encoder("mean_embed")
def mean_embedding(embeds, input_ids, mask):
    """The default: the mean of the LLM's input embeddings over the question tokens [B, D]."""
    del input_ids
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(embeds.astype(jnp.float32) * m, 1) / jnp.maximum(m.sum(1), 1)


@register_question_encoder("token_histogram")
def token_histogram(embeds, input_ids, mask, buckets: int = 256):
    """A bag of token ids hashed into 256 buckets, L2-normalised [B, 256] (no embeddings)."""
    del embeds
    counts = jnp.sum(jax.nn.one_hot(input_ids % buckets, buckets) * mask[..., None], axis=1)
    return counts / jnp.maximum(jnp.linalg.norm(counts, axis=-1, keepdims=True), 1e-6)


class LlavaForConditionalGeneration(nn.Module):
    """``__call__(input_ids [B, T], pixel_values [N_img, C, H, W], attention_mask [B, T])``
    -> LlavaOutput (float32 logits [B, T, V]).

    The number of image tokens in ``input_ids`` must be ``N_img * tokens_per_image(pixel_values.shape)``
    (``config.num_image_tokens``, but for Qwen2.5-VL's dynamic resolution).
    Outside jit a mismatch raises ValueError; under jit (values unknown at trace time) the
    logits are set to NaN so the mismatch can never pass silently.

    ``visual_tokens`` (a :class:`VisualTokenPolicy`, stock by default) rearranges each image's
    visual tokens after the ViT and before the projector: sink-to-the-front and its variants.
    Switch it on an existing model with ``model.clone(visual_tokens=VisualTokenPolicy("front"))``;
    the params do not change. Dropped tokens are masked out of attention (their own logits are
    meaningless) and, with "sequential" positions, the later tokens' positions close the gap
    (the policy's default positions are the family's: :meth:`family_positions`).

    ``interventions`` (:mod:`vitsink_jax.interventions`, none by default) switches on FastV /
    sink-aware token pruning, VAR attention redistribution, test-time registers and token
    reduction before the LLM the same way. Pruning and VAR take the ViT sinks of the policy's
    rule; pruning needs one image per row. Under token reduction each image gets
    ``interventions.image_slots(P)`` image tokens in ``input_ids`` (:meth:`reduce_visual`);
    ``vision_token_index`` in the output is then the kept tokens' (-1: a merged token).
    """

    config: LlavaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    visual_tokens: VisualTokenPolicy = VisualTokenPolicy()
    interventions: Interventions = Interventions()  # token pruning, VAR, test-time registers
    remat: bool = False  # recompute LLM layer activations in the backward pass (training memory)
    attention_impl: str = "xla"  # LLM: how layers attend where no weights are read (ATTENTION_IMPLS)
    scan_layers: bool = False  # LLM layers as one nn.scan, params stacked (see llm.stack_layers)
    remat_policy: str = "nothing_saveable"  # what remat may keep (llm.REMAT_POLICIES)
    merges_vit_tokens = False  # a visual token is one ViT token (MergedTokens: a window of them)

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_tower = registry.vision_tower_class(c.vision)(
            c.vision, test_time_registers=self.interventions.registers, **kw)
        self.multi_modal_projector = self.new_projector()  # DIYSink: the non-sink path
        if c.diysink is not None:
            self.multi_modal_projector_sink = self.new_projector()
            if c.diysink.reweight:
                self.reweighting = Reweighter(c.diysink.rew_hidden, **kw)
        # an LVLM's head never caps its logits (nor does transformers' Gemma 3 LVLM)
        self.language_model = CausalLM(c.text, remat=self.remat, attention_impl=self.attention_impl,
                                       scan_layers=self.scan_layers, remat_policy=self.remat_policy,
                                       head_bias=c.lm_head_bias, softcap_logits=False, **kw)

    def new_projector(self) -> nn.Module:
        """A projector of the family (called in setup): LLaVA's linear / MLP."""
        c = self.config
        return MLPProjector(c.text.hidden_size, c.projector_type, c.projector_hidden_act,
                            c.projector_bias, dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def policy(self) -> VisualTokenPolicy:
        """The visual-token policy in force: ``visual_tokens``, or for a DIYSink model sinks first
        with the DIYSink rule and selection, of which ``visual_tokens`` changes only the
        selection (non-"all": the sink-only / non-sink-only ablation) and the positions.
        Positions "family" resolve to this family's default (:meth:`family_positions`).

        A DIYSink model's projectors were trained on its own layout and sink rule, so it refuses
        (ValueError naming it) any order but "none" (its own layout: "front" would be a second
        name for it, "end" is not what it was trained on) and any rule but its own; the default
        ``SinkRule()`` of a policy stands for "the model's own"."""
        d, v = self.config.diysink, self.visual_tokens
        if v.positions == "family":
            v = dataclasses.replace(v, positions=self.family_positions())
        if d is None:
            return v
        if v.order != "none":
            raise ValueError(f"visual-token order {v.order!r} does not apply to a DIYSink model: it "
                             "puts its sinks first through its own projector, as trained; use order "
                             "'none' (its own layout)")
        if v.rule not in (SinkRule(), d.rule):
            raise ValueError(f"sink rule {v.rule} does not apply to a DIYSink model trained with "
                             f"{d.rule}; leave the policy's rule at its default or use the model's")
        return VisualTokenPolicy("front", d.select if v.select == "all" else v.select, v.positions, d.rule)

    def family_positions(self) -> str:
        """The visual tokens' positions after a rearrangement by default: "original" under
        multimodal RoPE (each token keeps its (t, h, w) ids: the spatial ids stay, as the paper
        notes), "sequential" with 1-D RoPE (the paper's reading: positions follow the new order)."""
        return "original" if self.config.text.mrope_section is not None else "sequential"

    def vision_features(self, pixel_values, output_attentions: bool = False):
        """pixel_values [N, C, H, W] -> (the features whose norms the sink rule reads, one per
        visual token [N, P, E'], VisionOutput). LLaVA: the projector input."""
        c = self.config
        vout = self.vision_tower(pixel_values, output_hidden_states=True,
                                 output_attentions=output_attentions)
        start = 1 if c.vision_feature_select_strategy == "default" else 0
        r = c.vision.num_register_tokens  # registers never reach the projector
        drop = lambda h: h if not r else jnp.concatenate([h[:, :1], h[:, 1 + r:]], 1)  # noqa: E731
        selected = jnp.concatenate([drop(vout.hidden_states[i])[:, start:] for i in c.feature_layers], -1)
        return selected, vout

    def projector_input(self, selected, vout):
        """The tokens the projector maps [N, P, E'] from :meth:`vision_features`' outputs
        (LLaVA: ``selected`` itself)."""
        del vout
        return selected

    def vision_token_index(self, selected, vout):
        """[N, P] int32: the index in the tower's token sequence of the token each visual token's
        feature in ``selected`` comes from (LLaVA: fixed by the config)."""
        del vout
        n, p = selected.shape[:2]
        return jnp.broadcast_to(jnp.asarray(self.config.vit_token_index(np.arange(p)), jnp.int32), (n, p))

    def tokens_per_image(self, pixel_shape: tuple) -> int:
        """Visual tokens per image of pixel_values of ``pixel_shape`` [N, C, H, W] (LLaVA: the
        config's; Qwen2.5-VL: the image size's)."""
        del pixel_shape
        return self.config.num_image_tokens

    def llm_positions(self, input_ids, attention_mask, cache, vout):
        """The LLM's position ids of a call with images when none are passed (LLaVA: None, the
        LLM's own default; Qwen2.5-VL: its [B, T, 3] multimodal ids)."""
        del input_ids, attention_mask, cache, vout
        return None

    def llm_inputs(self, input_ids) -> dict:
        """Extra LLM inputs of a call with images (LLaVA: none; Gemma 3: its image blocks)."""
        del input_ids
        return {}

    @property
    def sink_prefix(self) -> int:
        """Leading visual tokens that are never sinks and never move: the CLS token kept by
        ``vision_feature_select_strategy="full"`` unless the rule's ``include_cls`` is set."""
        return self.config.sink_prefix(self.policy.rule)

    def visual_sinks(self, selected):
        """ViT sinks of the sink features [N, P, E'] (:meth:`vision_features`: LLaVA's projector
        input, a merged token's loudest ViT token) under the policy's rule -> [N, P] bool
        (stock token order). Needs no params: callable on an unbound model."""
        return sink_mask(token_norms(selected), self.policy.rule, self.sink_prefix)

    def arrange(self, selected, route=None) -> VisualArrangement:
        """Sinks of the sink features [N, P, E'] and the policy's permutation / keep-mask;
        ``route`` [N] int (0 all, 1 sinks, 2 nonsinks) overrides the policy's selection."""
        policy, sinks = self.policy, self.visual_sinks(selected)
        perm, kept = arrange_visual_tokens(sinks, policy.order,
                                           policy.select if route is None else route,
                                           self.sink_prefix)
        return VisualArrangement(sink_mask=sinks, permutation=perm, kept=kept)

    def project(self, tokens, arrangement, weights=None):
        """Projector on the (rearranged) tokens [N, P, E'] -> [N, P, D]. DIYSink: sink slots go
        through the sink projector, the rest through the non-sink one, each scaled by its
        weight column of ``weights`` [N, 2] (ReW) when given."""
        nonsink = self.multi_modal_projector(tokens)
        if self.config.diysink is None:
            return nonsink
        sink = self.multi_modal_projector_sink(tokens)
        if weights is not None:
            sink = sink * weights[:, :1, None].astype(sink.dtype)
            nonsink = nonsink * weights[:, 1:, None].astype(nonsink.dtype)
        is_sink = permute_tokens(arrangement.sink_mask, arrangement.permutation)
        return jnp.where(is_sink[..., None], sink, nonsink)

    def question_weights(self, embeds, input_ids, question_mask):
        """ReW: (w_sink, w_nonsink) [B, 2] from the frozen question embedding of the configured
        encoder (see :data:`QUESTION_ENCODERS`); gradients stop at the encoder's output."""
        name = self.config.diysink.question_encoder
        if name not in QUESTION_ENCODERS:
            raise ValueError(f"unknown question encoder {name!r}; registered: {sorted(QUESTION_ENCODERS)}")
        q = QUESTION_ENCODERS[name](embeds, input_ids, question_mask)
        return self.reweighting(jax.lax.stop_gradient(q).astype(jnp.float32))

    def intervention_inputs(self, selected, arrangement, is_image) -> dict:
        """The LLM's inputs for pruning / VAR: visual-token slots [B, T], the ViT sinks of the
        policy's rule in sequence slots [B, T] and the visual tokens per row."""
        if self.interventions.prune is not None and selected.shape[0] != is_image.shape[0]:
            raise ValueError(f"token pruning needs one image per row; got {selected.shape[0]} "
                             f"images for {is_image.shape[0]} rows")
        if arrangement is None:
            sinks = self.visual_sinks(selected)
        else:
            sinks = permute_tokens(arrangement.sink_mask, arrangement.permutation)
        b, t = is_image.shape
        seq, _ = merge_image_features(jnp.zeros((b, t, 1)), is_image,
                                      sinks.reshape(-1, 1).astype(jnp.float32))
        return {"interventions": self.interventions, "visual_mask": is_image,
                "sink_mask": seq[..., 0] > 0, "num_visual": selected.shape[1]}

    def check_reduction(self, route=None) -> None:
        """Raises ValueError naming the reason when this model cannot run its token reduction
        (``interventions.reduce``; see :class:`~vitsink_jax.interventions.TokenReduction`)."""
        r, c = self.interventions.reduce, self.config
        if r is None:
            return
        name = f"token reduction {r.method!r} on {type(self).__name__}"
        if c.text.mrope_section is not None:
            raise ValueError(f"{name}: the kept tokens' multimodal RoPE ids are not wired")
        if c.diysink is not None or not self.policy.is_stock or route is not None:
            raise ValueError(f"{name}: needs the stock visual-token order (no DIYSink, no "
                             "sink-to-the-front, no route)")
        if not r.needs_cls:
            return
        if self.merges_vit_tokens:
            raise ValueError(f"{name}: each visual token merges a window of ViT tokens, so no "
                             "ViT token's attention ranks it (no [CLS] substitute)")
        if not c.vision.has_class_token and r.without_cls == "refused":
            raise ValueError(f"{name}: the {c.vision.model_type} tower has no [CLS] token and the "
                             f"method's authors give no substitute (on such towers: {r.without_cls})")
        if len(c.feature_layers) != 1:
            raise ValueError(f"{name}: one vision_feature_layer is needed, got {c.feature_layers}")

    def reduce_visual(self, to_project, vout):
        """Token reduction (``interventions.reduce``) of the projector's input [N, P, E'] and the
        tower's outputs -> (projected tokens [N, k, D]; local [N, k] int32, the visual token
        (of P) each slot holds, -1 for a merged one; valid [N, k] bool, False at PruMerge's
        unused slots). FasterVLM / VisionZip read the [CLS] attention of the layer that wrote
        the feature layer (``vout.attentions``), PruMerge the query and keys of the layer that
        reads it, VisionZip the keys of the first, DivPrune the projector's outputs."""
        r, c = self.interventions.reduce, self.config
        self.check_reduction()
        n, p = to_project.shape[:2]
        k, everyone = r.slots(p), jnp.ones((n, r.slots(p)), bool)
        if r.method == "divprune":
            feats = self.project(to_project, None)
            local = reduction.divprune(feats, k)
            return gather_tokens(feats, local), local, everyone
        index = self.vision_token_index(to_project, vout)                          # [N, P]
        at = reduction.attention_layer(c.feature_layers[0], c.vision.num_hidden_layers)
        if r.method == "prumerge":
            if at + 1 >= c.vision.num_hidden_layers:
                raise ValueError(f"token reduction 'prumerge' reads the layer after the feature "
                                 f"layer {c.feature_layers[0]}; the tower has none")
            q, keys = self.tower_qk(at + 1, vout)
            scores = reduction.single_head_cls_attention(q[:, 0], keys, index)
            tokens, local, valid = reduction.prumerge(scores, gather_tokens(keys, index), to_project,
                                                      r.neighbors)
            return self.project(tokens, None), local, valid
        weights = vout.attentions[at]
        scores = (reduction.cls_attention if c.vision.has_class_token else
                  reduction.mean_attention_received)(weights, index)
        if r.method == "fastervlm":
            local = reduction.top_k_in_order(scores, k)
            return self.project(gather_tokens(to_project, local), None), local, everyone
        _, keys = self.tower_qk(at, vout)
        heads = c.vision.num_attention_heads
        metric = keys.reshape(keys.shape[:2] + (heads, -1)).mean(axis=2)
        tokens, local = reduction.visionzip(scores, gather_tokens(metric, index), to_project,
                                            r.dominant, r.contextual)
        return self.project(tokens, None), local, everyone

    def tower_qk(self, layer: int, vout):
        """The query and key projections [N, S, C] of the vision tower's encoder ``layer`` on
        its input ``vout.hidden_states[layer]`` (:func:`~vitsink_jax.interventions.reduction.layer_qk`)."""
        c = self.config.vision
        return reduction.layer_qk(self.vision_tower.variables["params"], c.model_type, layer,
                                  vout.hidden_states[layer], c.layer_norm_eps)

    def reduced_tokens(self, pixel_values):
        """pixel_values [N, C, H, W] -> (the LLM's visual tokens [N, k, D] under
        ``interventions.reduce``, their tower positions [N, k] int32 (-1: a merged token),
        valid [N, k] bool); see :func:`~vitsink_jax.interventions.reduction.kept_positions`."""
        selected, vout = self.vision_features(pixel_values, self.interventions.reduce.needs_cls)
        feats, local, valid = self.reduce_visual(self.projector_input(selected, vout), vout)
        return feats, reduction.tower_positions(self.vision_token_index(selected, vout), local), valid

    def head(self, hidden):
        """The LLM's head: hidden states [..., D] (``last_hidden_state``) -> float32 logits
        [..., V]."""
        return self.language_model.head(hidden)

    def decode(self, input_ids, cache):
        """One decoding step on the LLM with a prefilled cache: input_ids [B, T] -> CausalLMOutput
        (logits [B, T, V], the updated cache). VAR stays on (new tokens are text: no visual, no
        sink); token pruning happened in the prefill."""
        extra = {}
        if self.interventions.var is not None:
            none = jnp.zeros(input_ids.shape, bool)
            extra = dict(interventions=Interventions(var=self.interventions.var), visual_mask=none,
                         sink_mask=none)
        return self.language_model(input_ids=input_ids, cache=cache, **extra)

    def decode_isolated(self, image_features):
        """F4 logit lens: each visual token pushed through the LLM alone.

        Attention between the token and every other token is blocked, which is the same as a
        sequence of length 1 (with RoPE a lone token's position cannot matter), so all tokens of
        all images run as one batch. image_features [N, P, D] (projector output)
        -> logits [N, P, V] float32.
        """
        n, p, d = image_features.shape
        out = self.language_model(inputs_embeds=image_features.reshape(n * p, 1, d))
        return out.logits.reshape(n, p, -1)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                 output_hidden_states: bool = False, output_attentions: bool = False,
                 output_vision: bool = False, route=None, question_mask=None,
                 cache=None, has_image=None, head: bool = True,
                 one_image_per_row: bool = False, prompt_mask=None) -> LlavaOutput:
        """route: [N_img] int per-image token selection (0 all, 1 sink-only, 2 non-sink-only),
        e.g. from CoT routing; concrete codes outside 0..2 raise, traced ones give NaN logits.
        question_mask: [B, T] bool, the question tokens DIYSink's ReW reads (required by a ReW
        model, which cannot tell the question from the template or an answer: training marks the
        human turn's text, :func:`vitsink_jax.data.tokenizer.encode_marked` marks the same in
        evaluation prompts; one image per row). Ignored by other models.
        cache: a :class:`KVCache` to prefill (see :mod:`vitsink_jax.generate`); positions then
        default to generation positions (running count of kept tokens) or, for a family with
        its own ids (:meth:`llm_positions`: Qwen2.5-VL's [B, T, 3]), to those counted from the
        cache's next position.
        has_image: [N_img] bool, one image per row: False for a text-only row, whose image (a
        blank stand-in that keeps the batch's shapes static) runs through the tower but is
        written nowhere, as LLaVA-1.5 trains its text-only conversations; its ids hold no image
        token.
        head: False skips the LM head (``logits`` None; ``last_hidden_state`` [B, T, D], NaN
        where the logits would be, for a loss applying :meth:`head` chunk by chunk).
        one_image_per_row: row b holds the tokens of image b and only those (training's rows):
        the features merge row by row (:func:`merge_image_features` ``per_row``); a row with
        another count of image tokens gives NaN logits.
        prompt_mask: [B, T], 1 at the prompt's tokens of a row that continues with a candidate
        answer (likelihood scoring): FastV pruning ranks the visual tokens by these queries'
        attention only, as generation's prefill of the prompt does (None: every token)."""
        c = self.config
        # an image id outside the vocabulary (the LLaVA codebase's) is never embedded
        text_ids = input_ids if c.image_token_index < c.text.vocab_size else jnp.where(
            input_ids == c.image_token_index, 0, input_ids)
        embeds = self.language_model.embed(text_ids)
        feats = selected = vout = arrangement = weights = None
        reduce = self.interventions.reduce
        if pixel_values is not None:
            selected, vout = self.vision_features(pixel_values, (output_attentions and output_vision) or
                                                  (reduce is not None and reduce.needs_cls))
            is_image = input_ids == c.image_token_index
            if position_ids is None:
                position_ids = self.llm_positions(input_ids, attention_mask, cache, vout)
            to_project = self.projector_input(selected, vout)
            if not self.policy.is_stock or route is not None:
                arrangement = self.arrange(selected, route)
                to_project = permute_tokens(to_project, arrangement.permutation)
            if c.diysink is not None and c.diysink.reweight:
                if selected.shape[0] != input_ids.shape[0]:
                    raise ValueError(f"DIYSink reweighting needs one image per row; got "
                                     f"{selected.shape[0]} images for {input_ids.shape[0]} rows")
                if question_mask is None:
                    raise ValueError("a DIYSink ReW model needs question_mask [B, T] (the question's "
                                     "tokens, as training marks them: data.tokenizer.encode_marked); "
                                     "pass input_ids != image_token_index to read every text token")
                if question_mask.shape != input_ids.shape:
                    raise ValueError(f"question_mask has shape {question_mask.shape}, input_ids "
                                     f"{input_ids.shape}")
                weights = self.question_weights(embeds, input_ids, question_mask)
            if reduce is None:
                feats = self.project(to_project, arrangement, weights)
            else:  # fewer tokens per image; PruMerge's unused slots dropped as a policy drops
                self.check_reduction(route)
                feats, local, valid = self.reduce_visual(to_project, vout)
                kept_index = reduction.tower_positions(self.vision_token_index(selected, vout), local)
                if reduce.method == "prumerge":
                    sinks = jnp.take_along_axis(self.visual_sinks(selected), jnp.maximum(local, 0), 1)
                    perm = jnp.broadcast_to(jnp.arange(local.shape[1], dtype=jnp.int32), local.shape)
                    arrangement = VisualArrangement(sink_mask=sinks & (local >= 0), permutation=perm,
                                                    kept=valid)
            expected = feats.shape[0] * feats.shape[1]
            writes = expected
            if has_image is not None:  # the image-token slots hold the present images, in order
                if self.interventions.prune or self.interventions.var or reduce:
                    raise ValueError("has_image (text-only rows) is for training; token pruning, "
                                     "VAR and token reduction read every row's image")
                writes = jnp.sum(has_image) * feats.shape[1]
                if arrangement is not None:
                    (arrangement,) = images_first(has_image, arrangement)
            if not isinstance(input_ids, jax.core.Tracer) and not isinstance(writes, jax.core.Tracer):
                found = int(np.sum(np.asarray(input_ids) == c.image_token_index))
                if found != int(writes):
                    raise ValueError(f"input_ids contain {found} image tokens (id "
                                     f"{c.image_token_index}) but pixel_values give "
                                     f"{int(writes) // feats.shape[1]} image(s) x {feats.shape[1]} "
                                     f"tokens = {int(writes)}")
            if one_image_per_row and feats.shape[0] != input_ids.shape[0]:
                raise ValueError(f"one_image_per_row: {feats.shape[0]} images for "
                                 f"{input_ids.shape[0]} rows")
            if one_image_per_row:
                embeds, count_ok = merge_image_features(embeds, is_image, feats, per_row=True,
                                                        has_image=has_image)
            else:
                flat = feats if has_image is None else images_first(has_image, feats)[0]
                embeds, count_ok = merge_image_features(embeds, is_image, flat.reshape(expected, -1),
                                                        writes)
            if route is not None:  # a bad code raises here when concrete, else NaN logits
                count_ok = count_ok & route_codes_ok(route)
            if arrangement is not None:
                b, t = input_ids.shape
                if position_ids is None and cache is None:
                    position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
                elif position_ids is None:
                    keep = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
                    position_ids = generation_positions(keep, cache.position)
                position_ids, dropped = arranged_positions(position_ids, is_image, arrangement,
                                                           self.policy.positions)
                keep = ~dropped if attention_mask is None else attention_mask.astype(bool) & ~dropped
                attention_mask = keep.astype(jnp.int32)
        extra = {}
        if pixel_values is not None:
            extra = self.llm_inputs(input_ids)
            if self.interventions.prune or self.interventions.var:
                extra.update(self.intervention_inputs(selected, arrangement, is_image),
                             prompt_mask=prompt_mask)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=position_ids,
                                  output_hidden_states=output_hidden_states,
                                  output_attentions=output_attentions, cache=cache, head=head,
                                  **extra)
        top = out.logits if head else out.last_hidden_state
        if pixel_values is not None:
            top = jnp.where(count_ok, top, jnp.nan)
        vision = output_vision and pixel_values is not None
        return LlavaOutput(logits=top if head else None, last_hidden_state=None if head else top,
                           hidden_states=out.hidden_states, attentions=out.attentions,
                           image_features=feats if vision else None,
                           vision_features=selected if vision else None,
                           vision_outputs=vout if vision else None,
                           vision_token_index=(self.vision_token_index(selected, vout) if reduce is None
                                               else kept_index) if vision else None,
                           visual_arrangement=arrangement if vision else None,
                           visual_weights=weights if vision else None, cache=out.cache)


registry.register_lvlm("llava", LlavaConfig, LlavaForConditionalGeneration)
