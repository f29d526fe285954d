"""Published sink interventions as switches on the LVLM, all off by default (stock parity):

* :class:`TokenPruning` - FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2",
  ECCV 2024): after LLM layer K drop the share r of visual tokens that received the least
  attention from the prompt's last token (FastV's code); ``keep_sinks`` makes it sink-aware (ViT sinks are never dropped, after this
  paper's finding that they carry the global meaning); ``debias`` ranks by the debiased score
  of Zhao et al. (2025, arXiv 2508.17807). The sequence really gets shorter.
* :class:`AttentionRedistribution` - VAR (Kang et al., "See What You Are Told: Visual Attention
  Sink in Large Multimodal Models", ICLR 2025): in image-centric heads, part of the attention
  paid to sink tokens is moved to the non-sink visual tokens (the official code's rules).
* :class:`TestTimeRegisters` - Jiang et al., "Vision Transformers Don't Need Trained Registers"
  (2025): the ViT MLP neurons that write the high-norm outliers are redirected into an extra
  token that is never passed on, removing the sinks without training.
* :class:`TokenReduction` - training-free visual-token reduction before the LLM: FasterVLM,
  VisionZip, LLaVA-PruMerge, DivPrune (:mod:`vitsink_jax.interventions.reduction`). The prompt
  holds ``image_slots`` image tokens per image instead of all of them.

Set them with ``model.clone(interventions=Interventions(prune=TokenPruning(2, 0.5)))``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class TokenPruning:
    """layer: K, visual tokens are dropped after the first K LLM layers (FastV: 2).
    ratio: r, the share of each image's visual tokens dropped (FastV: 0.5).
    keep_sinks: never drop a ViT sink (the model's sink rule), the sink-aware variant.
    score: "last" (attention from the prompt's last token, averaged over heads: FastV's code,
      the default) or "mean" (averaged over heads and every prompt token: the FastV paper's
      text). Only the prompt's queries vote: in likelihood scoring the candidate answer does
      not (the selection equals generation's, made at prefill).
    debias: attention debiasing before the ranking (Zhao et al., arXiv 2508.17807;
      :func:`~vitsink_jax.interventions.pruning.debiased_scores`): "none" (FastV), "fit" (each
      row's score divided by its exponential recency trend over the visual index, fitted to the
      row: no calibration data) or "weights" (the authors' code: the score times
      ``position_weights``, one per visual index, their trend fitted offline). Their second
      step, zero score at the padding of a padded image, is in the pure function only (the
      model passes no padding mask: the harness' images are cropped, not padded)."""

    layer: int = 2
    ratio: float = 0.5
    keep_sinks: bool = False
    score: str = "last"
    debias: str = "none"
    position_weights: tuple = ()

    def dropped(self, num_visual: int) -> int:
        """Visual tokens dropped per row (static) out of ``num_visual``."""
        return int(self.ratio * num_visual)

    def __post_init__(self):
        if (self.layer < 1 or not 0 <= self.ratio < 1 or self.score not in ("mean", "last")
                or self.debias not in ("none", "fit", "weights")
                or (self.debias == "weights") != bool(self.position_weights)):
            raise ValueError(f"bad token pruning: layer={self.layer} (>= 1), ratio={self.ratio} "
                             f"(in [0, 1)), score={self.score!r} (last | mean), debias="
                             f"{self.debias!r} (none | fit | weights, the last with "
                             f"position_weights, {len(self.position_weights)} given)")


@dataclasses.dataclass(frozen=True)
class AttentionRedistribution:
    """VAR, by default as its official code (MICV-yonsei/VisAttnSink) runs it. p: the share of
    sink attention kept (1 = stock; the method's 0.6); rho: a head is image-centric for a query
    when at most this share of its visual attention goes to visual sinks, and summ: it pays at
    least this much attention to the image at all.
    sinks: "dims" (the official rule: LLM sink tokens, text ones such as BOS included, those
    with max over ``sink_dims`` of |h[d]| / RMS(h) >= tau in the layer's input; their budget
    goes to the image too) or "vit" (the ViT sinks of the model's sink rule, this library's
    variant). sink_dims: the LLM's sink dimensions (needed with "dims";
    :func:`vitsink_jax.interventions.var.llm_sink_dims` finds them on data).
    queries: "after-image" (the official code: in a prefill only the queries after the image
    change, while decoding every query) or "all" (every query, image tokens included).
    visual_sink_required: a layer (per row) whose keys hold no visual sink is left alone (the
    official code); False redistributes the text sinks' attention there too.
    Layers from ``first_layer`` (the official code finds sinks from layer 2); the last layer is
    skipped when ``skip_last``. The earlier behaviour here: sinks="vit", queries="all",
    visual_sink_required=False."""

    p: float = 0.6
    rho: float = 0.5
    summ: float = 0.2
    sinks: str = "dims"
    sink_dims: tuple = ()
    tau: float = 20.0
    first_layer: int = 2
    skip_last: bool = True
    queries: str = "after-image"
    visual_sink_required: bool = True

    def __post_init__(self):
        if not 0 <= self.p <= 1 or self.sinks not in ("vit", "dims") or self.queries not in (
                "after-image", "all"):
            raise ValueError(f"bad attention redistribution: p={self.p} (in [0, 1]), "
                             f"sinks={self.sinks!r} (dims | vit), queries={self.queries!r} "
                             f"(after-image | all)")


@dataclasses.dataclass(frozen=True)
class TestTimeRegisters:
    """neurons: ((layer, neuron), ...) ViT MLP neurons that write the outliers (see
    :func:`vitsink_jax.interventions.registers.find_register_neurons`); registers: extra tokens
    appended to the ViT sequence (zeros; a CLIP tower's before its pre-LayerNorm, as the
    authors' code adds them, so they enter layer 0 as its bias), dropped before the projector;
    scale, value: the registers' activation = scale x the peak of
    :func:`~vitsink_jax.interventions.registers.move_to_registers` ("sign-max", the authors':
    one signed peak over the tokens and the layer's neurons; "per-neuron-max": each neuron's
    max); the patches' activation becomes 0."""

    neurons: tuple = ()
    registers: int = 1
    scale: float = 1.0
    value: str = "sign-max"

    def __post_init__(self):
        if self.registers < 1 or any(len(n) != 2 for n in self.neurons) or self.value not in (
                "sign-max", "per-neuron-max"):
            raise ValueError(f"bad test-time registers: registers={self.registers} (>= 1), "
                             f"neurons={self.neurons} (pairs of layer, neuron), value={self.value!r} "
                             f"(sign-max | per-neuron-max)")


# method -> what it does on a tower without a [CLS] token (SigLIP; the merged tokens of Gemma 3,
# InternVL after its pixel shuffle and Qwen2.5-VL have no single ViT token's [CLS] attention)
WITHOUT_CLS = {"fastervlm": "refused", "visionzip": "mean attention received (VisionZip's SigLIP code)",
               "prumerge": "refused", "divprune": "no [CLS] needed"}


@dataclasses.dataclass(frozen=True)
class TokenReduction:
    """Training-free visual-token reduction before the LLM, one method per ``method``; the LLM
    gets ``slots(P)`` tokens per image of P (the prompt holds that many image tokens).

    * "fastervlm" - FasterVLM (Zhang et al. 2024, "[CLS] Attention is All You Need for
      Training-Free Visual Token Pruning"): keep the ``int(ratio P)`` visual tokens the [CLS]
      query attends most (heads averaged) in the attention of the layer that produced the
      feature layer (``attentions[vision_feature_layer]``), before the projector; kept in
      sequence order.
    * "visionzip" - VisionZip (Yang et al., CVPR 2025): ``dominant`` tokens by the same [CLS]
      attention, in sequence order, then ``contextual`` tokens: the other tokens, in order, are
      split into targets (every max(1, R // contextual)-th, R = P - dominant) and the rest, each
      of the rest joins its most similar target by the cosine of the layer's keys averaged over
      heads, and a target's token is the mean of its group's features. Ours: the official code
      also keeps the [CLS]'s own feature as one more dominant token; here only the feature
      select strategy's visual tokens are candidates (dominant + contextual tokens in all).
    * "prumerge" - LLaVA-PruMerge (Shang et al. 2024): [CLS] attention from the full-width
      query and keys of the layer reading the feature layer, in one head (softmax(q k / sqrt C),
      the official code's); the outliers above Q3 + 1.5 IQR of an image's attention are kept
      (in descending attention), each replaced by itself plus the attention-weighted sum of
      its ``neighbors`` key-nearest (cosine) other visual tokens, and one more token, the
      attention-weighted sum of the pruned tokens, is appended (the official code's). Ours, for
      static shapes: the slots are the largest count the IQR rule can flag,
      P - 1 - floor(0.75 (P - 1)), plus the appended token; the slots past an image's outliers
      are masked out of the LLM's attention and their positions closed (as a dropped token of
      sink-to-the-front); the quartiles are per image (the official code's pool the batch).
    * "divprune" - DivPrune (Alvar et al., CVPR 2025): the ``round(ratio P)`` projector outputs
      of the greedy max-min cosine-distance subset (:func:`~.reduction.divprune`), in sequence
      order.

    Towers without a [CLS] token: :data:`WITHOUT_CLS` (``without_cls``) says what each method does.
    """

    method: str
    ratio: float = 0.25       # fastervlm / divprune: the share of visual tokens kept
    dominant: int = 54        # visionzip (LLaVA-1.5 at 64 tokens: 54 + 10)
    contextual: int = 10
    neighbors: int = 32       # prumerge: the official code's 32 nearest tokens

    def __post_init__(self):
        if self.method not in WITHOUT_CLS or not 0 < self.ratio <= 1 or min(
                self.dominant, self.contextual, self.neighbors) < 0 or (
                self.method == "visionzip" and self.dominant + self.contextual < 1):
            raise ValueError(f"bad token reduction: method={self.method!r} ({' | '.join(WITHOUT_CLS)}), "
                             f"ratio={self.ratio} (in (0, 1]), dominant={self.dominant}, "
                             f"contextual={self.contextual}, neighbors={self.neighbors} (>= 0)")

    @property
    def without_cls(self) -> str:
        """What the method does on a tower without a [CLS] token ("refused": a ValueError)."""
        return WITHOUT_CLS[self.method]

    @property
    def needs_cls(self) -> bool:
        """The method ranks tokens by attention (every method but DivPrune)."""
        return self.method != "divprune"

    def slots(self, num_visual: int) -> int:
        """The LLM's visual tokens per image of ``num_visual`` (static; PruMerge: an upper bound,
        its unused slots masked)."""
        n = num_visual
        k = {"fastervlm": int(self.ratio * n), "divprune": int(round(self.ratio * n)),
             "visionzip": self.dominant + self.contextual,
             "prumerge": n - 1 - (3 * (n - 1)) // 4 + 1}[self.method]
        if not 1 <= k <= n or (self.method == "visionzip" and self.contextual > n - self.dominant):
            raise ValueError(f"token reduction {self.method} keeps {k} of {num_visual} visual tokens "
                             f"(dominant={self.dominant}, contextual={self.contextual}, "
                             f"ratio={self.ratio}); it must keep 1 to all of them")
        return k


@dataclasses.dataclass(frozen=True)
class Interventions:
    prune: Optional[TokenPruning] = None
    var: Optional[AttentionRedistribution] = None
    registers: Optional[TestTimeRegisters] = None
    reduce: Optional[TokenReduction] = None

    def __post_init__(self):
        if self.reduce is not None and not (self.prune is None and self.var is None and
                                            self.registers is None):
            raise ValueError("token reduction runs alone: not with token pruning, VAR or "
                             "test-time registers (they read the tokens it removes)")

    @property
    def is_stock(self) -> bool:
        return self.prune is None and self.var is None and self.registers is None and self.reduce is None

    def image_slots(self, num_visual: int) -> int:
        """Image tokens per image of ``num_visual`` visual tokens the prompt holds (token
        reduction: the tokens it keeps; otherwise all)."""
        return self.reduce.slots(num_visual) if self.reduce else num_visual

    def tokens_kept(self, num_visual: int) -> int:
        """Visual tokens per row the LLM's later layers see (pruning drops some, reduction
        keeps :meth:`image_slots`; PruMerge: its static upper bound)."""
        n = self.image_slots(num_visual)
        return n - (self.prune.dropped(n) if self.prune else 0)


SPEC_HELP = ("stock | front | fastv[:ratio[:layer]] | fastv+sinks[:ratio[:layer]] | fastv-mean[:ratio[:layer]] | "
             "fastv-mean+sinks[:ratio[:layer]] | fastv-debias[:ratio[:layer]] | "
             "fastv-debias+sinks[:ratio[:layer]] | var[:p[:first_layer]] | var-vit[:p[:first_layer]] | "
             "registers[:neurons] | fastervlm[:ratio] | visionzip[:dominant[:contextual]] | "
             "prumerge[:neighbors] | divprune[:ratio]")
FASTV = {"fastv": ("last", False, "none"), "fastv+sinks": ("last", True, "none"),
         "fastv-mean": ("mean", False, "none"), "fastv-mean+sinks": ("mean", True, "none"),
         "fastv-debias": ("last", False, "fit"), "fastv-debias+sinks": ("last", True, "fit")}
# spec name -> (TokenPruning.score, keep_sinks, debias)


def parse(spec: str) -> tuple[Interventions, str, int]:
    """A comparison spec -> (interventions, visual-token order, register neurons to find).

    "stock", "front" (sink-to-the-front, this paper), "fastv:0.5:2" (FastV, ratio 0.5 after layer
    2, ranked by the prompt's last token as FastV's code), "fastv+sinks:0.5" (sink-aware pruning),
    "fastv-mean:0.5:2" / "fastv-mean+sinks" (ranked by the mean over the prompt's tokens),
    "fastv-debias:0.5:2" / "fastv-debias+sinks" (FastV's score with each row's recency trend
    divided out, attention debiasing's "fit"),
    "var:0.6:2" (VAR as its official code, keeping 60% of sink attention from layer 2 on: LLM
    sinks of ``sink_dims``, left empty here for the harness to find on the data), "var-vit:0.6:2"
    (the same on the ViT sinks), "registers:10" (test-time registers on the 10 top register neurons, found on the data),
    token reduction before the LLM (:class:`TokenReduction`): "fastervlm:0.25" (keep 25%),
    "visionzip:54:10" (54 dominant + 10 contextual tokens), "prumerge:32" (32 neighbours merged),
    "divprune:0.25".
    """
    name, *args = spec.split(":")
    try:
        nums = [float(a) for a in args]
        if name in ("stock", "front") and not nums:
            return Interventions(), "front" if name == "front" else "none", 0
        if name in FASTV and len(nums) <= 2:
            ratio, layer = (nums + [0.5, 2.0][len(nums):])[:2]
            score, keep_sinks, debias = FASTV[name]
            return Interventions(prune=TokenPruning(int(layer), ratio, keep_sinks, score, debias)), "none", 0
        if name in ("var", "var-vit") and len(nums) <= 2:
            p, first = (nums + [0.6, 2.0][len(nums):])[:2]
            sinks = "vit" if name == "var-vit" else "dims"
            return Interventions(var=AttentionRedistribution(p=p, first_layer=int(first), sinks=sinks)), "none", 0
        if name in ("fastervlm", "divprune") and len(nums) <= 1:
            return Interventions(reduce=TokenReduction(name, *(nums or [0.25]))), "none", 0
        if name == "visionzip" and len(nums) <= 2:
            dominant, contextual = (nums + [54, 10][len(nums):])[:2]
            return Interventions(reduce=TokenReduction(name, dominant=int(dominant),
                                                       contextual=int(contextual))), "none", 0
        if name == "prumerge" and len(nums) <= 1:
            return Interventions(reduce=TokenReduction(name, neighbors=int(nums[0]) if nums else 32)), "none", 0
        if name == "registers" and len(nums) <= 1:
            return Interventions(), "none", int(nums[0]) if nums else 10
    except ValueError as e:
        raise ValueError(f"intervention {spec!r}: {e}") from e
    raise ValueError(f"intervention {spec!r} is not one of {SPEC_HELP}")
