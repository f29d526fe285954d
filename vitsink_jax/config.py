"""Frozen model configs, built from (and written back to) Hugging Face ``config.json`` dicts.

Parsing goes through transformers' own config classes (torch-free), so HF defaults, legacy keys
(``rope_scaling`` vs ``rope_parameters``) and version differences are resolved exactly as
transformers resolves them. The original dict is kept (``hf_json``) so that a load -> save round
trip preserves fields we do not model (token ids, architectures, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional, Union

from .sinks.detect import SinkRule

VISION_TYPES = {"clip_vision_model": "clip_vision_model", "clip": "clip_vision_model",
                "siglip_vision_model": "siglip_vision_model", "siglip": "siglip_vision_model",
                "dinov2": "dinov2", "dinov2_with_registers": "dinov2_with_registers",
                "internvl_vision": "internvl_vision", "qwen2_5_vl_vision": "qwen2_5_vl_vision"}
TEXT_TYPES = ("llama", "qwen2", "phi", "phi3", "gemma3_text", "qwen2_5_vl_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
SELECT_STRATEGIES = ("default", "full")


def _hf_config(d: dict):
    """Returns transformers' config object for ``d`` (fills HF defaults, normalises legacy keys)."""
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type")
    d.pop("transformers_version", None)
    return AutoConfig.for_model(model_type, **d)


def _freeze(x):
    """Makes nested lists/dicts hashable so a config can be a static (hashable) module field."""
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


def _thaw_rope(rope: Optional[tuple]) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (rope or ())}


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
        if self.model_type not in set(VISION_TYPES.values()):
            raise ValueError(f"unknown vision model_type {self.model_type!r}; supported: "
                             f"{sorted(VISION_TYPES)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"InternViT norm_type {self.norm_type!r} not one of layer_norm, rms_norm")

    @property
    def has_class_token(self) -> bool:
        return self.model_type not in ("siglip_vision_model", "qwen2_5_vl_vision")

    @property
    def takes_test_time_registers(self) -> bool:
        """Test-time registers (extra tokens every patch attends to) fit this tower; not
        Qwen2.5-VL's, whose windows would each need their own."""
        return self.model_type != "qwen2_5_vl_vision"

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
        if d.get("model_type") == "qwen2_5_vl_vision" and cls is VisionConfig:
            return Qwen2_5_VisionConfig.from_hf(d)
        if d.get("model_type") not in VISION_TYPES:
            raise ValueError(f"unknown vision model_type {d.get('model_type')!r}; supported: "
                             f"{sorted(VISION_TYPES)}")
        if d["model_type"] in ("clip", "siglip"):  # full CLIP/SigLIP checkpoint: use its vision half
            d = dict(d.get("vision_config") or {}, model_type=d["model_type"] + "_vision_model")
        c = _hf_config(d)
        if getattr(c, "use_swiglu_ffn", False):
            raise ValueError(f"{c.model_type} with use_swiglu_ffn=True (the giant DINOv2) is not "
                             "supported")
        dino, intern = c.model_type.startswith("dinov2"), c.model_type == "internvl_vision"
        side = lambda v: v if isinstance(v, int) else int(v[0])  # noqa: E731  (InternViT: [h, w])
        if intern and (side(c.image_size) != c.image_size[-1] or side(c.patch_size) != c.patch_size[-1]):
            raise ValueError(f"internvl_vision image_size {c.image_size} / patch_size {c.patch_size}: "
                             "only square images and patches are supported")
        if intern and not c.use_absolute_position_embeddings:
            raise ValueError("internvl_vision without absolute position embeddings is not supported")
        return cls(model_type=c.model_type, hidden_size=c.hidden_size,
                   intermediate_size=int(c.hidden_size * c.mlp_ratio) if dino else c.intermediate_size,
                   num_hidden_layers=c.num_hidden_layers,
                   num_attention_heads=c.num_attention_heads, image_size=side(c.image_size),
                   patch_size=side(c.patch_size), num_channels=c.num_channels,
                   layer_norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act,
                   vision_use_head=bool(getattr(c, "vision_use_head", False)),
                   layerscale_value=float(c.layer_scale_init_value if intern
                                          else getattr(c, "layerscale_value", 1.0)),
                   num_register_tokens=int(getattr(c, "num_register_tokens", 0)),
                   qkv_bias=bool(c.attention_bias if intern else getattr(c, "qkv_bias", True)),
                   qk_norm=bool(intern and c.use_qk_norm), norm_type=c.norm_type if intern else "layer_norm",
                   mean_pooling=bool(c.use_mean_pooling) if intern else True, hf_json=json.dumps(d))

    def to_hf(self) -> dict:
        d = json.loads(self.hf_json)
        d.update(model_type=self.model_type, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, image_size=self.image_size,
                 patch_size=self.patch_size, num_channels=self.num_channels,
                 layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act)
        if self.model_type == "siglip_vision_model":
            d["vision_use_head"] = self.vision_use_head
        if self.is_dinov2:
            del d["intermediate_size"]
            ratio = self.intermediate_size / self.hidden_size
            d.update(mlp_ratio=int(ratio) if ratio.is_integer() else ratio,
                     layerscale_value=self.layerscale_value, qkv_bias=self.qkv_bias)
            if self.num_register_tokens:
                d["num_register_tokens"] = self.num_register_tokens
        if self.is_internvit:
            d.update(layer_scale_init_value=self.layerscale_value, attention_bias=self.qkv_bias,
                     use_qk_norm=self.qk_norm, norm_type=self.norm_type,
                     use_mean_pooling=self.mean_pooling)
        return d


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VisionConfig(VisionConfig):
    """Qwen2.5-VL's vision tower (transformers' Qwen2_5_VisionTransformerPretrainedModel): no CLS
    token and no absolute positions; 2-D rotary embeddings (height and width halves of each
    head's frequencies); RMSNorm blocks with a gated SiLU MLP; attention inside windows of
    ``window_size`` pixels except in ``full_attention_layers``; patches of ``patch_size`` pixels
    seen as ``temporal_patch_size`` identical frames (a still image). ``image_size`` is not in
    transformers' config (the resolution is dynamic): here it is the square side used where one
    fixed size is needed (batched evaluation), from the LVLM's ``vitsink_image_size``."""

    hidden_act: str = "silu"
    layer_norm_eps: float = 1e-6
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    full_attention_layers: tuple = ()
    out_hidden_size: int = 0
    rope_theta: float = 10000.0

    def __post_init__(self):
        super().__post_init__()
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit or self.image_size % unit:
            raise ValueError(f"qwen2_5_vl_vision window_size {self.window_size} and image size "
                             f"{self.image_size} must be multiples of patch_size x spatial_merge_size = {unit}")
        if isinstance(self.full_attention_layers, list):
            object.__setattr__(self, "full_attention_layers", tuple(self.full_attention_layers))

    @property
    def mlp_bias(self) -> bool:
        """The gated MLP's projections have biases (read by layers.GatedMLP)."""
        return True

    @property
    def merge_unit(self) -> int:
        """Pixels per side of one merged visual token (patch_size x spatial_merge_size)."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_hf(cls, d: dict, image_size: int = 448) -> "Qwen2_5_VisionConfig":
        from transformers import Qwen2_5_VLVisionConfig

        c = Qwen2_5_VLVisionConfig(**{k: v for k, v in d.items() if k not in ("model_type", "transformers_version")})
        rope = dict(c.rope_parameters or {})
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"qwen2_5_vl_vision rope_type {rope['rope_type']!r}: only the axial 2-D RoPE exists")
        return cls(model_type="qwen2_5_vl_vision", hidden_size=c.hidden_size,
                   intermediate_size=c.intermediate_size, num_hidden_layers=c.depth, num_attention_heads=c.num_heads, image_size=image_size,
                   patch_size=c.patch_size, num_channels=c.in_channels, hidden_act=c.hidden_act,
                   spatial_merge_size=c.spatial_merge_size, temporal_patch_size=c.temporal_patch_size,
                   window_size=c.window_size, full_attention_layers=tuple(c.fullatt_block_indexes),
                   out_hidden_size=c.out_hidden_size, rope_theta=float(rope.get("rope_theta", 10000.0)),
                   hf_json=json.dumps(d))

    def to_hf(self) -> dict:
        d = json.loads(self.hf_json)
        d.update(model_type=self.model_type, depth=self.num_hidden_layers, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_heads=self.num_attention_heads,
                 in_channels=self.num_channels, patch_size=self.patch_size, hidden_act=self.hidden_act,
                 spatial_merge_size=self.spatial_merge_size, temporal_patch_size=self.temporal_patch_size,
                 window_size=self.window_size, fullatt_block_indexes=list(self.full_attention_layers),
                 out_hidden_size=self.out_hidden_size,
                 rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta})
        return d


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Decoder LLM of one of :data:`TEXT_TYPES`:

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
        if self.model_type not in TEXT_TYPES:
            raise ValueError(f"unknown text model_type {self.model_type!r}; supported: {TEXT_TYPES}")
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
        if d.get("model_type") not in TEXT_TYPES:
            raise ValueError(f"unknown text model_type {d.get('model_type')!r}; supported: {TEXT_TYPES}")
        c = _hf_config(d)
        if getattr(c, "use_sliding_window", False):
            raise ValueError("qwen2 config has use_sliding_window=true; sliding-window attention "
                             "is not implemented for qwen2")
        rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        gemma, local = c.model_type == "gemma3_text", {}
        if gemma:
            if getattr(c, "use_bidirectional_attention", False):
                raise ValueError("gemma3_text with use_bidirectional_attention=true (an embedding "
                                 "model) is not supported")
            local, rope = dict(rope["sliding_attention"]), dict(rope["full_attention"])
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"gemma3_text sliding_attention rope_type {local['rope_type']!r}: "
                                 "only plain RoPE is implemented for the local layers")
        theta = rope.pop("rope_theta", getattr(c, "rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) == 1.0:
            rope.pop("partial_rotary_factor", None)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        phi = c.model_type == "phi"
        return cls(model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                   intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                   num_attention_heads=c.num_attention_heads,
                   num_key_value_heads=c.num_key_value_heads or c.num_attention_heads,
                   head_dim=head_dim, max_position_embeddings=c.max_position_embeddings,
                   rms_norm_eps=c.layer_norm_eps if phi else c.rms_norm_eps, rope_theta=float(theta),
                   rope_scaling=None if rope == {"rope_type": "default"} else _freeze(rope),
                   attention_bias=bool(getattr(c, "attention_bias", False)),
                   mlp_bias=bool(getattr(c, "mlp_bias", False)),
                   tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
                   hidden_act=c.hidden_activation if gemma else c.hidden_act,
                   qk_layernorm=bool(getattr(c, "qk_layernorm", False)),
                   sliding_window=getattr(c, "sliding_window", None)
                   if c.model_type in ("phi3", "gemma3_text") else None,
                   layer_types=tuple(c.layer_types) if gemma else None,
                   query_pre_attn_scalar=c.query_pre_attn_scalar if gemma else None,
                   rope_local_theta=float(local["rope_theta"]) if gemma else None,
                   final_logit_softcapping=getattr(c, "final_logit_softcapping", None) if gemma else None,
                   hf_json=json.dumps(d))

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
                 hidden_act=self.hidden_act, rope_theta=self.rope_theta)
        d["layer_norm_eps" if self.is_phi else "rms_norm_eps"] = self.rms_norm_eps
        rope = self.rope
        if "partial_rotary_factor" in rope:  # a top-level key in every transformers version
            d["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        if rope and rope != {"rope_type": "default"}:
            d["rope_scaling"] = rope
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.is_phi:
            d["qk_layernorm"] = self.qk_layernorm
        if self.model_type == "phi3":
            d["sliding_window"] = self.sliding_window
        if self.mrope_section is not None:
            d["rope_parameters"] = {**d.pop("rope_scaling"), "rope_theta": d.pop("rope_theta")}
        if self.is_gemma:
            full = {"rope_type": "default", **rope, "rope_theta": d.pop("rope_theta")}
            d.pop("rope_scaling", None)
            d["hidden_activation"] = d.pop("hidden_act")
            d.update(rope_parameters={"full_attention": full, "sliding_attention": {
                         "rope_type": "default", "rope_theta": self.rope_local_theta}},
                     sliding_window=self.sliding_window, layer_types=list(self.layer_types),
                     query_pre_attn_scalar=self.query_pre_attn_scalar,
                     final_logit_softcapping=self.final_logit_softcapping,
                     attention_bias=self.attention_bias)
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
        text = _tied(text, bool(d.get("tie_word_embeddings", False)) or text.tie_word_embeddings)
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


def _tied(text: "TextConfig", tied: bool) -> "TextConfig":
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
    ``vision_token_index`` says."""

    @property
    def num_image_tokens(self) -> int:
        return self.token_grid ** 2

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
        if d.get("model_type") != "gemma3":
            raise ValueError(f"expected model_type 'gemma3', got {d.get('model_type')!r}")
        vision = VisionConfig.from_hf(d.get("vision_config") or {"model_type": "siglip_vision_model"})
        text = TextConfig.from_hf({"model_type": "gemma3_text", **(d.get("text_config") or {})})
        text = _tied(text, bool(d.get("tie_word_embeddings", True)))  # the top level decides
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
    def projector_input_size(self) -> int:
        """The pixel shuffle puts a window's pool ** 2 tokens side by side."""
        return self.vision.hidden_size * self.pool ** 2

    @property
    def token_grid(self) -> int:
        return self.vision.grid_size // self.pool

    @classmethod
    def from_hf(cls, d: dict) -> "InternVLConfig":
        if d.get("model_type") != "internvl":
            raise ValueError(f"expected model_type 'internvl', got {d.get('model_type')!r}")
        vision = VisionConfig.from_hf(d.get("vision_config") or {"model_type": "internvl_vision"})
        text = TextConfig.from_hf(d.get("text_config") or {"model_type": "qwen2"})
        text = _tied(text, bool(d.get("tie_word_embeddings", True)))  # the top level decides
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


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig(MergedTokensConfig):
    """Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration): the windowed ViT
    (:class:`Qwen2_5_VisionConfig`) -> the patch merger (RMSNorm of each ViT token, each 2 x 2
    window's four tokens side by side, two-layer MLP) -> a Qwen2 LLM with multimodal RoPE
    (``qwen2_5_vl_text``). Dynamic resolution: an image of any size whose sides are multiples
    of ``vision.merge_unit`` pixels gives (H / unit) x (W / unit) visual tokens; ``image_size``
    (``vitsink_image_size`` in config.json, default 448) is the square side of the fixed-size
    pipelines (batched evaluation, training).

    Sinks (``vision_features``): read on the last ViT block's tokens before the merger's
    RMSNorm; each visual token carries the largest-norm ViT token of its 2 x 2 window. Its
    (temporal, height, width) position ids move with it (policy positions "original"), or the
    kept tokens fill the image's raster of ids in their new order ("sequential")."""

    image_token_index: int = 151655
    projector_type: str = "qwen2_5_vl"
    vision_feature_layer: FeatureLayer = -1
    vision_feature_select_strategy: str = "full"
    image_size: int = 448
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if not isinstance(self.vision, Qwen2_5_VisionConfig):
            raise ValueError(f"Qwen2.5-VL's tower is qwen2_5_vl_vision, not {self.vision.model_type}")
        if self.text.mrope_section is None:
            raise ValueError("Qwen2.5-VL's LLM needs rope_parameters.mrope_section (multimodal RoPE)")
        if self.image_size != self.vision.image_size or self.projector_type != "qwen2_5_vl" or \
                self.vision_feature_layer != -1 or self.vision_feature_select_strategy != "full":
            raise ValueError("Qwen2.5-VL has its own projector (the patch merger) and feature selection; "
                             "its image_size is the tower's")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"the merger's out_hidden_size {self.vision.out_hidden_size} is not the LLM's "
                             f"hidden_size {self.text.hidden_size}")

    @property
    def pool(self) -> int:
        return self.vision.spatial_merge_size

    @property
    def projector_input_size(self) -> int:
        """The merger puts a window's pool ** 2 ViT tokens side by side."""
        return self.vision.hidden_size * self.pool ** 2

    @property
    def token_grid(self) -> int:
        """Visual tokens per side of an ``image_size`` square."""
        return self.image_size // self.vision.merge_unit

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2_5_VLConfig":
        if d.get("model_type") != "qwen2_5_vl":
            raise ValueError(f"expected model_type 'qwen2_5_vl', got {d.get('model_type')!r}")
        c = _hf_config(d)
        size = int(d.get("vitsink_image_size", 448))
        vision = Qwen2_5_VisionConfig.from_hf(c.vision_config.to_dict(), image_size=size)
        text = TextConfig.from_hf({**c.text_config.to_dict(), "model_type": "qwen2_5_vl_text"})
        text = _tied(text, bool(c.tie_word_embeddings))
        return cls(vision=vision, text=text, image_token_index=c.image_token_id, image_size=size,
                   vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id,
                   diysink=diysink_of(d), hf_json=json.dumps(d))

    def to_hf(self) -> dict:
        d = json.loads(self.hf_json)
        text = self.text.to_hf()
        d.update(model_type="qwen2_5_vl", vision_config=self.vision.to_hf(), text_config=text,
                 image_token_id=self.image_token_index, vision_start_token_id=self.vision_start_token_id,
                 vision_end_token_id=self.vision_end_token_id,
                 tie_word_embeddings=text.pop("tie_word_embeddings"), vitsink_image_size=self.image_size)
        return self._with_diysink(d, "Qwen2_5_VLForConditionalGeneration")


LVLM_TYPES = {"llava": LlavaConfig, "gemma3": Gemma3Config, "internvl": InternVLConfig,
              "qwen2_5_vl": Qwen2_5_VLConfig}
ModelConfig = Union[VisionConfig, TextConfig, LlavaConfig]


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Dispatches a config.json dict on ``model_type``; unknown types raise ValueError naming it
    and the supported families."""
    mt = d.get("model_type")
    if mt == "qwen2_5_vl_vision":
        raise ValueError("model_type 'qwen2_5_vl_vision': a Qwen2.5-VL tower alone is not loaded (its "
                         "checkpoint holds the merger too); load the whole model (model_type 'qwen2_5_vl')")
    if mt in LVLM_TYPES:
        return LVLM_TYPES[mt].from_hf(d)
    if mt in VISION_TYPES:
        return VisionConfig.from_hf(d)
    if mt in TEXT_TYPES:
        return TextConfig.from_hf(d)
    towers = sorted(t for t in VISION_TYPES if t != "qwen2_5_vl_vision")
    raise ValueError(f"unknown model_type {mt!r}: not a family vitsink_jax runs; supported: LVLM "
                     f"{', '.join(LVLM_TYPES)}; vision tower {', '.join(towers)}; LLM "
                     f"{', '.join(TEXT_TYPES)}")
