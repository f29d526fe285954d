"""Frozen model configs, built from (and written back to) Hugging Face ``config.json`` dicts: the
fields every family shares and their generic parsing. What one family adds (a tower's or an LLM's
own keys, an LVLM's config class) lives in its file in models/ and is found through
:mod:`vitsink_jax.models.registry` by ``model_type`` (:func:`config_from_hf`).

Parsing goes through transformers' own config classes (torch-free), so HF defaults, legacy keys
(``rope_scaling`` vs ``rope_parameters``) and version differences are resolved exactly as
transformers resolves them. The original dict is kept (``hf_json``) so that a load -> save round
trip preserves fields we do not model (token ids, architectures, ...).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Optional, Union

from .sinks.detect import SinkRule

LAYER_TYPES = ("full_attention", "sliding_attention")
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
SELECT_STRATEGIES = ("default", "full")


def _registry():
    """:mod:`vitsink_jax.models.registry` (imported when first asked: it imports nothing of
    vitsink_jax, and ``import vitsink_jax`` has registered every family by then)."""
    from .models import registry

    return registry


def hf_config(d: dict):
    """Returns transformers' config object for ``d`` (fills HF defaults, normalises legacy keys)."""
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type")
    d.pop("transformers_version", None)
    return AutoConfig.for_model(model_type, **d)


def freeze(x):
    """Makes nested lists/dicts hashable so a config can be a static (hashable) module field."""
    if isinstance(x, dict):
        return tuple(sorted((k, freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(freeze(v) for v in x)
    return x


def _thaw_rope(rope: Optional[tuple]) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (rope or ())}


def hf_rope(c) -> dict:
    """The rope dict of transformers' config object ``c`` (``rope_parameters``, or the legacy
    ``rope_scaling``; empty for neither)."""
    return dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})


def rope_fields(rope: dict, theta: float = 10000.0) -> dict:
    """TextConfig's ``rope_theta`` and ``rope_scaling`` from an HF rope dict (its ``rope_theta``,
    else ``theta``; ``type`` read as ``rope_type``; a partial_rotary_factor of 1 dropped)."""
    rope = dict(rope)
    theta = rope.pop("rope_theta", theta)
    rope.setdefault("rope_type", rope.pop("type", "default"))
    if rope.get("partial_rotary_factor", 1.0) == 1.0:
        rope.pop("partial_rotary_factor", None)
    return dict(rope_theta=float(theta), rope_scaling=None if rope == {"rope_type": "default"} else freeze(rope))

@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """How an image becomes pixel_values [3, H, W], the steps of transformers' image processors
    in their order: RGB; resize (``resize`` "shortest_edge": the shorter side to ``size``, the
    aspect kept; "square": ``size`` x ``size``; "": none) with PIL's ``resample``; centre crop to
    ``crop`` x ``crop`` (0: none); multiply by ``rescale`` (0: none); when ``normalize``,
    (x - ``mean``) / ``std`` per channel. ``processor``: transformers' class the steps are
    (e.g. "CLIPImageProcessor"); ``source``: the preprocessor_config.json they were read from,
    "" for a family's default (:mod:`vitsink_jax.convert.processor`)."""

    processor: str
    resize: str
    size: int
    resample: int
    crop: int
    rescale: float
    normalize: bool
    mean: tuple
    std: tuple
    source: str = dataclasses.field(default="", compare=False)

    @property
    def output_size(self) -> int:
        """Side of the square images it gives (0: the image's own shape decides)."""
        return self.crop or (self.size if self.resize == "square" else 0)


# A config's image processing (read from a folder's preprocessor_config.json) changes no
# computation: configs equal but for it are equal (and share compiled functions).
_PROCESSING = dict(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT vision tower: CLIP (class token, pre-LN, quick_gelu), SigLIP (no class token, head),
    DINOv2 (LayerScale, registers) or InternViT (``internvl_vision``: class token, LayerScale,
    LayerNorm or RMSNorm blocks, optional RMSNorm of the whole q and k)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    vision_use_head: bool = False
    layerscale_value: float = 1.0     # DINOv2
    num_register_tokens: int = 0      # DINOv2 with registers
    qkv_bias: bool = True             # DINOv2, InternViT (its attention_bias)
    qk_norm: bool = False             # InternViT: RMSNorm of q and k over all heads
    norm_type: str = "layer_norm"     # InternViT: "layer_norm" or "rms_norm" blocks
    mean_pooling: bool = True         # InternViT: no final LayerNorm (pooled by the mean)
    image_processing: Optional[ImageProcessing] = dataclasses.field(**_PROCESSING)
    hf_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def __post_init__(self):
        _registry().family(self.model_type, "vision", tower=True)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"InternViT norm_type {self.norm_type!r} not one of layer_norm, rms_norm")

    @property
    def has_class_token(self) -> bool:
        return self.model_type != "siglip_vision_model"

    @property
    def takes_test_time_registers(self) -> bool:
        """Test-time registers (extra tokens every patch attends to) fit this tower."""
        return True

    @property
    def is_dinov2(self) -> bool:
        return self.model_type.startswith("dinov2")

    @property
    def is_internvit(self) -> bool:
        return self.model_type == "internvl_vision"

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches inside the tower (CLS and registers)."""
        return int(self.has_class_token) + self.num_register_tokens

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.has_class_token)

    @classmethod
    def from_hf(cls, d: dict) -> "VisionConfig":
        """A tower's config.json dict: the shared fields here, the tower's own read by its
        family (:mod:`vitsink_jax.models.registry`)."""
        family = _registry().family(d.get("model_type"), "vision")
        if family.read is not None:
            return family.read(d)
        c = hf_config(d)
        return cls(**{**dict(model_type=c.model_type, hidden_size=c.hidden_size,
                                intermediate_size=getattr(c, "intermediate_size", 0),
                                num_hidden_layers=c.num_hidden_layers,
                                num_attention_heads=c.num_attention_heads, image_size=c.image_size,
                                patch_size=c.patch_size, num_channels=c.num_channels,
                                layer_norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act),
                      **family.fields(c)}, hf_json=json.dumps(d))

    def to_hf(self) -> dict:
        d = json.loads(self.hf_json)
        d.update(model_type=self.model_type, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, image_size=self.image_size,
                 patch_size=self.patch_size, num_channels=self.num_channels,
                 layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act)
        _registry().family(self.model_type, "vision").write(self, d)
        return d


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Decoder LLM (the registered text model_types; each family's own keys are read in its file:
    llama / qwen2 in llm.py, phi / phi3 in phi.py, gemma3_text in gemma.py, qwen2_5_vl_text in
    qwen2_5_vl.py):

    * llama (LLaMA / Vicuna) and qwen2 (q/k/v bias, usually tied embeddings): pre-norm RMSNorm
      blocks, gated SiLU MLP;
    * phi (Phi-1 / Phi-2): one LayerNorm per block feeding attention and MLP in parallel, biases
      everywhere (the LM head too), partial rotary embedding, fc1 / fc2 MLP (gelu_new), optional
      q / k LayerNorm (``qk_layernorm``);
    * phi3 (Phi-3 / Phi-3.5 / Phi-4-mini): LLaMA's block with fused ``qkv_proj`` / ``gate_up_proj``
      in the checkpoint (split into q / k / v and gate / up on load, fused again on save:
      :mod:`vitsink_jax.convert.hf`), longrope scaling, partial rotary, ``sliding_window``;
    * qwen2_5_vl_text (Qwen2.5-VL's LLM): Qwen2's block with multimodal RoPE: the rotary dims
      split into ``mrope_section`` (temporal, height, width) sections, each rotated by its own
      axis of [B, T, 3] position ids (1-D ids rotate like plain RoPE);
    * gemma3_text (Gemma 3): four (1 + w) RMSNorms per block (before / after attention and the
      MLP), RMSNorm of each head's q and k, scores scaled by ``query_pre_attn_scalar`` ** -0.5,
      gated gelu_pytorch_tanh MLP, embeddings times sqrt(hidden_size), a tied head. Its
      ``layer_types`` alternate local layers (``sliding_window``, RoPE base ``rope_local_theta``)
      and global ones (RoPE base ``rope_theta`` with ``rope_scaling``).

    ``rope_scaling`` holds HF's rope dict (rope_type, factor, partial_rotary_factor < 1, ...).
    ``attn_logit_softcapping`` is not read: transformers' Gemma 3 attention ignores it too.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6  # the block norms' epsilon (phi: its layer_norm_eps)
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # frozen items of HF's rope dict (rope_type, factor, ...)
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qk_layernorm: bool = False  # phi only
    sliding_window: Optional[int] = None  # phi3, gemma3_text: keys at most this many slots back
    layer_types: Optional[tuple] = None  # gemma3_text: full_attention / sliding_attention per layer
    query_pre_attn_scalar: Optional[float] = None  # gemma3_text: scores x this ** -0.5
    rope_local_theta: Optional[float] = None  # gemma3_text: the RoPE base of sliding layers
    final_logit_softcapping: Optional[float] = None  # gemma3_text: tanh cap of a CausalLM's logits
    hf_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def __post_init__(self):
        _registry().family(self.model_type, "text")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu" and not (self.is_phi or self.is_gemma):
            raise ValueError(f"{self.model_type} hidden_act {self.hidden_act!r} is not supported "
                             "(only 'silu')")
        if self.qk_layernorm and self.model_type != "phi":
            raise ValueError("qk_layernorm is a phi option")
        if self.sliding_window is not None and self.model_type not in ("phi3", "gemma3_text"):
            raise ValueError(f"sliding_window is implemented for phi3 and gemma3_text, not "
                             f"{self.model_type}")
        if self.is_gemma:
            if self.layer_types is None or len(self.layer_types) != self.num_hidden_layers or \
                    set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(f"gemma3_text layer_types {self.layer_types} must give one of "
                                 f"{LAYER_TYPES} for each of the {self.num_hidden_layers} layers")
            if self.query_pre_attn_scalar is None or self.rope_local_theta is None or \
                    self.sliding_window is None:
                raise ValueError("gemma3_text needs query_pre_attn_scalar, rope_local_theta and "
                                 "sliding_window (its local layers' kind is told by the window)")
        if self.mrope_section is not None and 2 * sum(self.mrope_section) != self.rotary_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to the rotary dims / 2 = "
                             f"{self.rotary_dim // 2}")

    @property
    def is_gemma(self) -> bool:
        """Gemma 3's block (four (1 + w) RMSNorms, q / k norms, scaled embeddings)."""
        return self.model_type == "gemma3_text"

    @property
    def layer_windows(self) -> tuple:
        """Each layer's sliding window (None: it attends to every earlier key): Phi-3's window
        in every layer, Gemma 3's in its sliding_attention layers."""
        if self.is_gemma:
            return tuple(self.sliding_window if t == "sliding_attention" else None
                         for t in self.layer_types)
        return (self.sliding_window,) * self.num_hidden_layers

    @property
    def local_rope(self) -> "TextConfig":
        """The config whose RoPE a sliding layer reads: Gemma 3's local base, plain RoPE; the
        config itself for other families."""
        if not self.is_gemma:
            return self
        return dataclasses.replace(self, rope_theta=self.rope_local_theta, rope_scaling=None)

    @property
    def is_phi(self) -> bool:
        """Phi-1 / Phi-2's parallel block (LayerNorm, fc1 / fc2, biases), not LLaMA's."""
        return self.model_type == "phi"

    @property
    def qkv_bias(self) -> bool:
        return self.model_type in ("qwen2", "phi", "qwen2_5_vl_text") or self.attention_bias

    @property
    def mrope_section(self) -> Optional[tuple]:
        """Qwen2.5-VL's multimodal RoPE: rotary frequencies per (temporal, height, width) axis
        (they sum to head_dim / 2); None for plain RoPE."""
        section = self.rope.get("mrope_section")
        return None if section is None else tuple(section)

    @property
    def o_bias(self) -> bool:
        return self.is_phi or (self.model_type in ("llama", "gemma3_text") and self.attention_bias)

    @property
    def lm_head_bias(self) -> bool:
        """PhiForCausalLM's head has a bias (a LLaVA's own head never does: see LlavaConfig)."""
        return self.is_phi

    @property
    def rope(self) -> dict:
        """HF's rope dict: ``rope_type`` plus its parameters (empty for plain RoPE)."""
        return _thaw_rope(self.rope_scaling)

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (head_dim x partial_rotary_factor)."""
        return int(self.head_dim * self.rope.get("partial_rotary_factor", 1.0))

    @classmethod
    def from_hf(cls, d: dict) -> "TextConfig":
        """An LLM's config.json dict: the shared fields here, the family's own read by its
        family (:mod:`vitsink_jax.models.registry`)."""
        family = _registry().family(d.get("model_type"), "text")
        c = hf_config(d)
        if getattr(c, "use_sliding_window", False):
            raise ValueError("qwen2 config has use_sliding_window=true; sliding-window attention "
                             "is not implemented for qwen2")
        shared = dict(model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                      num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
                      head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                      max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=getattr(c, "rms_norm_eps", 1e-6),
                      **rope_fields(hf_rope(c), getattr(c, "rope_theta", 10000.0)),
                      attention_bias=bool(getattr(c, "attention_bias", False)),
                      mlp_bias=bool(getattr(c, "mlp_bias", False)),
                      tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
                      hidden_act=getattr(c, "hidden_act", "silu"))
        return cls(**{**shared, **family.fields(c)}, hf_json=json.dumps(d))

    def to_hf(self) -> dict:
        d = json.loads(self.hf_json)
        for k in ("rope_scaling", "rope_parameters", "rope_theta", "partial_rotary_factor"):
            d.pop(k, None)
        d.update(model_type=self.model_type, vocab_size=self.vocab_size,
                 hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                 max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings,
                 hidden_act=self.hidden_act, rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps)
        rope = self.rope
        if "partial_rotary_factor" in rope:  # a top-level key in every transformers version
            d["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        if rope and rope != {"rope_type": "default"}:
            d["rope_scaling"] = rope
        _registry().family(self.model_type, "text").write(self, d)
        return d


FeatureLayer = Union[int, tuple]


@dataclasses.dataclass(frozen=True)
class DIYSinkConfig:
    """DIYSink (paper Sec. 4.2): a second projector for the ViT-sink tokens, sinks first, and an
    optional reweighting MLP (ReW). Stored in config.json under ``"diysink"``; transformers
    ignores that key and loads the non-sink projector as its ``multi_modal_projector``.

    rule: how sinks are detected on the projector input (see :class:`SinkRule`).
    select: "all" (both paths, the default), "sinks" or "nonsinks" (the token-selection ablation);
      a per-row ``route`` passed to the model (CoT routing) overrides it.
    reweight: add the ReW MLP: a frozen question embedding (mean of the LLM's input embeddings
      over the question tokens) -> hidden -> 2 logits -> w = 2 * softmax. The factor 2 makes the
      zero-initialised MLP start at w_sink = w_nonsink = 1, i.e. exactly the model without ReW
      (the paper leaves the normalisation UNKNOWN; a plain softmax would halve every visual
      embedding at the start).
    rew_hidden: width of the ReW MLP's hidden layer.
    question_encoder: the frozen question encoder ReW reads, by registered name (pluggable:
      ``vitsink_jax.models.lvlm.register_question_encoder``); "mean_embed" (default, the mean
      of the LLM's input embeddings over the question tokens: offline, no extra weights) or
      "token_histogram".
    """

    rule: SinkRule = SinkRule()
    select: str = "all"
    reweight: bool = False
    rew_hidden: int = 64
    question_encoder: str = "mean_embed"

    def __post_init__(self):
        if isinstance(self.rule, dict):
            object.__setattr__(self, "rule", SinkRule(**self.rule))
        if self.select not in ("all", "sinks", "nonsinks"):
            raise ValueError(f"diysink select {self.select!r} not one of all, sinks, nonsinks")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "rule": dataclasses.asdict(self.rule)}

@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """LLaVA composition: vision tower -> projector -> LLM, with HF's feature-selection options.

    ``vision_feature_layer`` indexes the vision tower's ``hidden_states`` tuple (HF order,
    embeddings first); a tuple of layers concatenates them on the feature axis.
    ``projector_type`` "linear" (LLaVA-1) is not representable in transformers' Llava class;
    such checkpoints load back into vitsink_jax only. Nor is ``lm_head_bias`` (the LM head of a
    TinyLLaVA Phi-2 LLM has a bias; transformers' Llava head never has one): stored in
    config.json as ``vitsink_lm_head_bias``. ``image_aspect_ratio`` "pad": images are padded to
    a square with the processor's mean colour before it (the original LLaVA codebase's and
    TinyLLaVA's ``image_aspect_ratio: pad``; stored as ``vitsink_image_aspect_ratio``), "crop":
    the processor's own resize and crop. ``image_processing``: the folder's
    preprocessor_config.json (None: the family's default processor), written back by
    ``save_pretrained``.
    """

    model_type: ClassVar[str] = "llava"  # config.json's (each LVLM config class sets its own)
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 32000
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    vision_feature_layer: FeatureLayer = -2
    vision_feature_select_strategy: str = "default"
    diysink: Optional[DIYSinkConfig] = None
    image_size: int = 0  # input side in pixels; 0 = the tower's; others need a DINOv2 tower
    lm_head_bias: bool = False
    image_aspect_ratio: str = "crop"
    image_processing: Optional[ImageProcessing] = dataclasses.field(**_PROCESSING)
    hf_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def __post_init__(self):
        if self.image_aspect_ratio not in ("crop", "pad"):
            raise ValueError(f"image_aspect_ratio {self.image_aspect_ratio!r} not one of crop, pad")
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector_type {self.projector_type!r}; supported: "
                             f"{PROJECTOR_TYPES}")
        if self.vision_feature_select_strategy not in SELECT_STRATEGIES:
            raise ValueError(f"unknown vision_feature_select_strategy "
                             f"{self.vision_feature_select_strategy!r}; supported: {SELECT_STRATEGIES}")
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        if self.image_size and self.image_size != self.vision.image_size and (
                not self.vision.is_dinov2 or self.image_size % self.vision.patch_size):
            raise ValueError(f"image_size {self.image_size} differs from the {self.vision.model_type} "
                             f"tower's {self.vision.image_size}: only DINOv2 towers interpolate, and "
                             f"only to multiples of the patch size {self.vision.patch_size}")

    @property
    def feature_layers(self) -> tuple:
        v = self.vision_feature_layer
        return tuple(v) if isinstance(v, tuple) else (v,)

    @property
    def projector_input_size(self) -> int:
        """Width of the tokens the projector reads (the feature layers side by side)."""
        return self.vision.hidden_size * len(self.feature_layers)

    @property
    def visual_cls_offset(self) -> int:
        """Leading non-patch tokens in the visual features (1 when the CLS token is kept)."""
        return int(self.vision_feature_select_strategy == "full" and self.vision.has_class_token)

    def sink_prefix(self, rule) -> int:
        """Leading visual tokens that are never sinks under ``rule`` and never move: the CLS
        token kept by ``vision_feature_select_strategy="full"`` unless ``rule.include_cls``."""
        return 0 if rule.include_cls else self.visual_cls_offset

    @property
    def dropped_patches(self) -> int:
        """Patches that never reach the LLM: "default" drops the tower's first token, which is
        a patch when the tower has no CLS token (SigLIP: 728 of 729 tokens reach the LLM in
        TinyLLaVA's "patch" selection and in transformers' Llava alike)."""
        return int(self.vision_feature_select_strategy == "default" and not self.vision.has_class_token)

    @property
    def patch_offset(self) -> int:
        """Added to the visual-token index of a patch token gives its patch index (row-major)."""
        return self.dropped_patches - self.visual_cls_offset

    def vit_token_index(self, visual_index):
        """Visual-token index (what the projector sees: CLS when kept, then the patches) ->
        index in the vision tower's token sequence (CLS, trained registers, patches)."""
        off = self.visual_cls_offset
        return visual_index + (visual_index >= off) * (self.vision.prefix_tokens - off) + \
            self.dropped_patches

    def patch_values(self, values, fill=0):
        """Per-visual-token values [P] -> per-patch values [grid ** 2] (a kept CLS left out, a
        dropped patch set to ``fill``), for maps over the patch grid."""
        import numpy as np

        values = np.asarray(values)[self.visual_cls_offset:]
        return np.concatenate([np.full(self.dropped_patches, fill, values.dtype), values])

    @property
    def input_size(self) -> int:
        """Side of the images the model is fed (pixels)."""
        return self.image_size or self.vision.image_size

    @property
    def grid_size(self) -> int:
        """Patches per side of the input images (the tower's token grid)."""
        return self.input_size // self.vision.patch_size

    @property
    def token_grid(self) -> int:
        """Visual tokens per side of the grid the LLM sees (the patch grid; Gemma 3: pooled)."""
        return self.grid_size

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image that reach the LLM (registers never do)."""
        return self.grid_size ** 2 + self.visual_cls_offset - self.dropped_patches

    @classmethod
    def from_hf(cls, d: dict) -> "LlavaConfig":
        if d.get("model_type") != "llava":
            raise ValueError(f"expected model_type 'llava', got {d.get('model_type')!r}")
        vision = VisionConfig.from_hf(d.get("vision_config") or {"model_type": "clip_vision_model"})
        text = TextConfig.from_hf(d.get("text_config") or {"model_type": "llama"})
        # transformers' LlavaConfig: the head is tied if either level says so
        text = tied_head(text, bool(d.get("tie_word_embeddings", False)) or text.tie_word_embeddings)
        layer = d.get("vision_feature_layer", -2)
        return cls(vision=vision, text=text,
                   image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
                   projector_type=d.get("projector_type", "mlp2x_gelu"),
                   projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                   projector_bias=d.get("multimodal_projector_bias", True),
                   vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
                   vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
                   diysink=diysink_of(d),
                   image_size=int(d.get("vitsink_image_size", 0)),
                   lm_head_bias=bool(d.get("vitsink_lm_head_bias", False)),
                   image_aspect_ratio=d.get("vitsink_image_aspect_ratio", "crop"),
                   hf_json=json.dumps(d))

    def to_hf(self) -> dict:
        d = json.loads(self.hf_json)
        layer = self.vision_feature_layer
        d.update(model_type="llava", vision_config=self.vision.to_hf(), text_config=self.text.to_hf(),
                 image_token_index=self.image_token_index,
                 projector_hidden_act=self.projector_hidden_act,
                 multimodal_projector_bias=self.projector_bias,
                 vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer,
                 vision_feature_select_strategy=self.vision_feature_select_strategy,
                 image_seq_length=self.num_image_tokens, tie_word_embeddings=self.text.tie_word_embeddings)
        d.setdefault("architectures", ["LlavaForConditionalGeneration"])
        if self.projector_type != "mlp2x_gelu":
            d["projector_type"] = self.projector_type
        d.pop("diysink", None)
        d.pop("vitsink_image_size", None)
        d.pop("vitsink_lm_head_bias", None)
        d.pop("vitsink_image_aspect_ratio", None)
        if self.lm_head_bias:
            d["vitsink_lm_head_bias"] = True
        if self.image_aspect_ratio != "crop":
            d["vitsink_image_aspect_ratio"] = self.image_aspect_ratio
        if self.image_size:
            d["vitsink_image_size"] = self.image_size
        if self.diysink is not None:
            d["diysink"] = self.diysink.to_dict()
        return d


def tied_head(text: "TextConfig", tied: bool) -> "TextConfig":
    """``text`` with the LM head tied as the LVLM's config.json says (transformers 5 reads the
    top-level ``tie_word_embeddings`` of an LVLM, not its text config's)."""
    return dataclasses.replace(text, tie_word_embeddings=tied)


def diysink_of(d: dict) -> Optional[DIYSinkConfig]:
    """The DIYSink block of an LVLM's config.json (None for a stock model)."""
    return DIYSinkConfig(**d["diysink"]) if d.get("diysink") else None


class MergedTokensConfig(LlavaConfig):
    """Base of the LVLM configs whose visual tokens each merge a ``pool`` x ``pool`` window of
    ViT patches (:mod:`vitsink_jax.models.merge`); subclasses define ``token_grid`` and ``pool``.
    Which tower token a visual token's sink feature is depends on the image: the model output's
    ``vision_token_index`` says. ``side_by_side``: the projector reads a window's pool ** 2 ViT
    tokens side by side (InternVL's pixel shuffle, Qwen2.5-VL's merger), not one pooled token
    (Gemma 3's average)."""

    side_by_side: ClassVar[bool] = True

    @property
    def num_image_tokens(self) -> int:
        return self.token_grid ** 2

    @property
    def projector_input_size(self) -> int:
        return self.vision.hidden_size * (self.pool ** 2 if self.side_by_side else 1)

    @classmethod
    def read_parts(cls, d: dict, vision_type: str, text_type: str) -> tuple:
        """(vision, text) configs of config.json ``d`` (checked to be of ``cls.model_type``), a
        part's model_type ``vision_type`` / ``text_type`` unless it says, the LM head tied as the
        top-level ``tie_word_embeddings`` says (default true)."""
        if d.get("model_type") != cls.model_type:
            raise ValueError(f"expected model_type {cls.model_type!r}, got {d.get('model_type')!r}")
        vision = VisionConfig.from_hf({"model_type": vision_type, **(d.get("vision_config") or {})})
        text = TextConfig.from_hf({"model_type": text_type, **(d.get("text_config") or {})})
        return vision, tied_head(text, bool(d.get("tie_word_embeddings", True)))  # the top level decides

    def _with_diysink(self, d: dict, architecture: str) -> dict:
        """config.json ``d`` with the architecture (unless set) and the DIYSink block (or none)."""
        d.setdefault("architectures", [architecture])
        d.pop("diysink", None)
        if self.diysink is not None:
            d["diysink"] = self.diysink.to_dict()
        return d

    def vit_token_index(self, visual_index):
        raise NotImplementedError(f"a {self.projector_type} visual token merges a window of ViT tokens: "
                                  "take the one it carries from the model output's vision_token_index")


ModelConfig = Union[VisionConfig, TextConfig, LlavaConfig]


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Dispatches a config.json dict on ``model_type`` through the registry
    (:mod:`vitsink_jax.models.registry`); unknown types raise ValueError naming it and the
    supported families."""
    family = _registry().family(d.get("model_type"))
    if family.part_of:
        raise ValueError(f"model_type {d['model_type']!r}: {family.part_of}")
    if family.kind == "lvlm":
        return family.config.from_hf(d)
    return VisionConfig.from_hf(d) if family.kind == "vision" else TextConfig.from_hf(d)
