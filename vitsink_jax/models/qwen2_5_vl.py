"""Qwen2.5-VL with the semantics of transformers' Qwen2_5_VLForConditionalGeneration: the
windowed ViT (2-D RoPE, RMSNorm blocks, attention inside windows except in a few full layers)
-> the patch merger (each 2 x 2 window of ViT tokens becomes one visual token) -> a Qwen2 LLM
whose RoPE turns with (temporal, height, width) position ids (:mod:`vitsink_jax.models.llm`).

Dynamic resolution with static shapes: the images of one call share one size (any multiple of
``vision.merge_unit`` pixels per side, aspect ratio free), from which the patch grid, the
windows and the position ids follow at trace time; another size is another compiled program
(batch images of one size together, or resize them to ``config.image_size``).

Token order: the tower keeps its patch tokens row-major over the patch grid (transformers keeps
them in its processor's 2 x 2-block order and, inside the blocks, in window order; attention
does not depend on the order, so the hidden states are the same tokens permuted). A windowed
block gathers each window's patches into a row and attends inside it (scores [N W, H, M, M],
M the patches of a window), or, when the attention weights are asked for, runs one S x S
attention masked to the windows. The visual tokens are the merged 2 x 2 windows,
row-major, as transformers feeds them to the LLM.

Everything else (sink-to-the-front, DIYSink, the interventions, the KV cache) is the LLaVA
composition's; this module supplies the tower, the merger, the sink tokens and the 3-D ids.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..config import (FeatureLayer, MergedTokensConfig, TextConfig, VisionConfig, diysink_of, hf_config,
                      tied_head)
from . import registry
from .attention import dot_product_attention
from .layers import ConfigModule, GatedMLP, PreNormBlock, RMSNorm, activation
from .lvlm import LlavaForConditionalGeneration
from .merge import MergedTokens, check_type_ids
from .outputs import VisionOutput
from .rope import apply_rotary
from .tower import VisionTower, layer_loop, tower_output


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
    def has_class_token(self) -> bool:
        return False

    @property
    def takes_test_time_registers(self) -> bool:
        """No: each attention window would need its own registers."""
        return False

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

    model_type: ClassVar[str] = "qwen2_5_vl"
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
    def token_grid(self) -> int:
        """Visual tokens per side of an ``image_size`` square."""
        return self.image_size // self.vision.merge_unit

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2_5_VLConfig":
        if d.get("model_type") != "qwen2_5_vl":
            raise ValueError(f"expected model_type 'qwen2_5_vl', got {d.get('model_type')!r}")
        c = hf_config(d)
        size = int(d.get("vitsink_image_size", 448))
        vision = Qwen2_5_VisionConfig.from_hf(c.vision_config.to_dict(), image_size=size)
        text = TextConfig.from_hf({**c.text_config.to_dict(), "model_type": "qwen2_5_vl_text"})
        text = tied_head(text, bool(c.tie_word_embeddings))
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


def _write_mrope(config: TextConfig, d: dict) -> None:
    """qwen2_5_vl_text's config.json keeps its multimodal RoPE in ``rope_parameters``."""
    if config.mrope_section is not None:
        d["rope_parameters"] = {**d.pop("rope_scaling"), "rope_theta": d.pop("rope_theta")}


def check_qwen_pixels(config: Qwen2_5_VisionConfig, pixel_values) -> tuple:
    """Raises ValueError naming the shape unless pixel_values is [N, C, H, W] with C the tower's
    channels and H, W multiples of ``merge_unit``; returns the patch grid (H / p, W / p)."""
    unit = config.merge_unit
    if pixel_values.ndim != 4 or pixel_values.shape[1] != config.num_channels or \
            pixel_values.shape[2] % unit or pixel_values.shape[3] % unit:
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [N, "
                         f"{config.num_channels}, H, W] with H and W multiples of {unit} (patch "
                         f"{config.patch_size} x merge {config.spatial_merge_size}) for qwen2_5_vl_vision")
    return pixel_values.shape[2] // config.patch_size, pixel_values.shape[3] // config.patch_size


def patch_coordinates(grid: tuple) -> np.ndarray:
    """[gh * gw, 2] int32 (row, column) of each patch, row-major over the (gh, gw) grid."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], -1).astype(np.int32)


def attention_windows(config: Qwen2_5_VisionConfig, grid: tuple) -> np.ndarray:
    """[gh * gw] int32: the attention window of each patch (row-major): windows of
    ``window_size`` pixels tile the grid of merged tokens from the top left, the last row and
    column of windows cut short where the grid ends (transformers' get_vision_window_index)."""
    per = config.window_size // config.merge_unit  # merged tokens per window side
    rc = patch_coordinates(grid) // config.spatial_merge_size // per
    across = -(-grid[1] // config.spatial_merge_size // per)
    return (rc[:, 0] * across + rc[:, 1]).astype(np.int32)


def window_gather(window: np.ndarray) -> tuple:
    """The layout of windowed attention for patch windows ``window`` [S] (:func:`attention_windows`):
    (index [W, M] int32: the patches of each window, row-major, padded with patch 0; valid [W, M]
    bool: not padding; inverse [S] int32: each patch's place in the flattened [W * M])."""
    order = np.argsort(window, kind="stable")
    counts = np.bincount(window)
    rank = np.arange(len(window)) - np.repeat(np.cumsum(counts) - counts, counts)
    m = int(counts.max())
    index = np.zeros((len(counts), m), np.int32)
    valid = np.zeros((len(counts), m), bool)
    index[window[order], rank] = order
    valid[window[order], rank] = True
    inverse = np.empty(len(window), np.int32)
    inverse[order] = window[order] * m + rank
    return index, valid, inverse


def vision_rope(config: Qwen2_5_VisionConfig, grid: tuple):
    """(cos, sin) each [1, gh * gw, head_dim] float32: the tower's 2-D RoPE, the first half of
    each head's frequencies turned by the patch row, the second by its column."""
    head_dim = config.hidden_size // config.num_attention_heads
    half = head_dim // 2
    inv = 1.0 / (config.rope_theta ** (np.arange(0, half, 2, dtype=np.float32) / half))
    rc = jnp.asarray(patch_coordinates(grid), jnp.float32)
    freqs = jnp.concatenate([rc[:, :1] * inv, rc[:, 1:] * inv], -1)
    emb = jnp.concatenate([freqs, freqs], -1)[None]
    return jnp.cos(emb), jnp.sin(emb)


def windowed_attention(q, k, v, window: np.ndarray):
    """Attention inside each window, one window at a time: q, k, v [N, S, H, D] and the
    patches' windows [S] -> out [N, S, H, D]. Each window's patches are gathered into a row of
    M (the largest window; the cut-short ones padded and masked as keys), so the scores are
    [N W, H, M, M] instead of [N, H, S, S]."""
    index, valid, inverse = window_gather(window)
    n, _, h, d = q.shape
    w, m = index.shape
    rows = lambda t: t[:, index.reshape(-1)].reshape(n * w, m, h, d)  # noqa: E731
    mask = jnp.broadcast_to(jnp.asarray(valid)[None, :, None, None, :], (n, w, 1, 1, m)).reshape(n * w, 1, 1, m)
    out, _ = dot_product_attention(rows(q), rows(k), rows(v), mask)
    return out.reshape(n, w * m, h, d)[:, inverse]


class Qwen2_5_VisionAttention(ConfigModule):
    """One fused ``qkv`` projection, 2-D RoPE on q and k (turned in float32, as transformers
    does), ``proj`` out (HF's names)."""

    @nn.compact
    def __call__(self, x, window, cos, sin, output_attentions=False):
        """x [N, S, E]; window [S] int (each patch's attention window) or None (full attention)
        -> ([N, S, E], weights [N, H, S, S] when ``output_attentions``: then a windowed block
        runs as one masked S x S attention, else window by window)."""
        c = self.config
        n, s, e = x.shape
        h = c.num_attention_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (t[:, :, 0] for t in jnp.split(
            nn.Dense(3 * e, name="qkv", **kw)(x).reshape(n, s, 3, h, e // h), 3, axis=2))
        q, k = (apply_rotary(t.astype(jnp.float32), cos, sin).astype(t.dtype) for t in (q, k))
        weights = None
        if window is not None and not output_attentions:
            out = windowed_attention(q, k, v, window)
        else:
            mask = None if window is None else jnp.asarray(window[:, None] == window[None, :])[None, None]
            out, weights = dot_product_attention(q, k, v, mask)
        return nn.Dense(e, name="proj", **kw)(out.reshape(n, s, e)), (weights if output_attentions else None)


class Qwen2_5_VisionBlock(PreNormBlock):
    """x + attn(norm1(x)); x + mlp(norm2(x)) with RMSNorms and a gated MLP with biases; the
    attention reads ``window``, ``cos``, ``sin`` (:class:`Qwen2_5_VisionAttention`)."""

    norm_names = ("norm1", "norm2")

    def norm(self, name):
        return RMSNorm(self.config.layer_norm_eps, name=name, **self.kw)

    def attend(self, x, output_attentions, window=None, cos=None, sin=None):
        return Qwen2_5_VisionAttention(self.config, name="attn", **self.kw)(x, window, cos, sin, output_attentions)

    def mlp(self, x, edit):
        return GatedMLP(self.config, name="mlp", **self.kw)(x)


class PatchEmbed(ConfigModule):
    """``proj``: a bias-free Conv3d over (frames, rows, columns) of one patch, as transformers'
    Qwen2_5_VisionPatchEmbed: [M, tp, p, p, C] -> [M, 1, 1, 1, E]."""

    @nn.compact
    def __call__(self, x):
        c = self.config
        size = (c.temporal_patch_size, c.patch_size, c.patch_size)
        return nn.Conv(c.hidden_size, size, strides=size, padding="VALID", use_bias=False,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)


class MergerMLP(nn.Module):
    """``0`` -> GELU -> ``2`` (transformers' nn.Sequential indices)."""

    width: int
    out_features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return nn.Dense(self.out_features, name="2", **kw)(activation("gelu")(nn.Dense(self.width, name="0", **kw)(x)))


class Qwen2_5_VisionTower(VisionTower):
    """``__call__(pixel_values [N, C, H, W])`` -> VisionOutput over the gh x gw patches
    (row-major): ``hidden_states`` = the patch embeddings then every block's output,
    ``last_hidden_state`` = the last block's (the merger normalises it), ``grid`` = (gh, gw).
    Each image is one sequence; windowed blocks attend inside their window only."""

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states: bool = False,
                 output_attentions: bool = False) -> VisionOutput:
        c = self.config
        if self.test_time_registers is not None and self.test_time_registers.neurons:
            raise NotImplementedError("test-time registers on Qwen2.5-VL's windowed tower: a register "
                                      "token would have to sit in every attention window "
                                      "(VisionConfig.takes_test_time_registers)")
        grid = check_qwen_pixels(c, pixel_values)
        n, ch = pixel_values.shape[:2]
        p, tp = c.patch_size, c.temporal_patch_size
        x = pixel_values.astype(self.dtype).reshape(n, ch, grid[0], p, grid[1], p)
        x = x.transpose(0, 2, 4, 3, 5, 1).reshape(n * grid[0] * grid[1], 1, p, p, ch)
        x = jnp.broadcast_to(x, (x.shape[0], tp, p, p, ch))  # a still image: tp equal frames
        x = PatchEmbed(c, self.dtype, self.param_dtype, name="patch_embed")(x)
        x = x.reshape(n, grid[0] * grid[1], c.hidden_size)
        window = attention_windows(c, grid)
        cos, sin = vision_rope(c, grid)
        step = lambda i, x: Qwen2_5_VisionBlock(c, self.dtype, self.param_dtype, name=f"blocks_{i}")(  # noqa: E731
            x, output_attentions, window=None if i in c.full_attention_layers else window, cos=cos, sin=sin)
        x, states, attns = layer_loop(x, c.num_hidden_layers, step)
        return tower_output(x, None, states, attns, output_hidden_states, output_attentions, grid=grid)


class PatchMerger(nn.Module):
    """Qwen2_5_VLPatchMerger on windows laid side by side: [..., k * k * E] -> RMSNorm
    ``ln_q`` of each of the k * k tokens -> ``mlp`` (:class:`MergerMLP`) -> [..., D]."""

    out_features: int
    width: int  # E, the tower's width
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shape = x.shape
        x = RMSNorm(self.eps, name="ln_q", **kw)(x.reshape(shape[:-1] + (-1, self.width))).reshape(shape)
        return MergerMLP(shape[-1], self.out_features, name="mlp", **kw)(x)


def mrope_positions(input_ids, attention_mask, image_token_index: int, grid: tuple, start=None):
    """Qwen2.5-VL's 3-D position ids (transformers' get_rope_index for still images).

    Args:
      input_ids: [B, T]; every run of gh * gw image tokens is one image of gh x gw merged tokens
        (``grid``, all images alike).
      attention_mask: [B, T] 1 = token (None: all); pads take the position after them.
      start: [B] int the rows' first position (a KV cache's next position; None: 0).
    Returns:
      [B, T, 3] int32 (temporal, height, width): a text token has its three ids equal, one past
      the largest id before it; an image's tokens share its first temporal id and add their row /
      column to it; the image spans max(gh, gw) positions.
    """
    gh, gw = grid
    per = gh * gw
    keep = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    is_image = (input_ids == image_token_index).astype(jnp.int32) * keep
    text = keep - is_image
    text_before = jnp.cumsum(text, 1) - text
    k = jnp.cumsum(is_image, 1) - is_image           # image tokens before this one in the row
    image, offset = k // per, k % per
    images_before = (k + per - 1) // per             # whole images before a text token
    extent = max(gh, gw)
    base = text_before + jnp.where(is_image > 0, image, images_before) * extent
    if start is not None:
        base = base + start[:, None]
    rows = jnp.where(is_image > 0, offset // gw, 0)
    cols = jnp.where(is_image > 0, offset % gw, 0)
    return jnp.stack([base, base + rows, base + cols], -1).astype(jnp.int32)


def unflatten_patches(flat, grid_thw, vision: Qwen2_5_VisionConfig):
    """The Qwen2-VL image processor's flattened patches -> pixels [N, C, H, W].

    Args:
      flat: [N * gh * gw, C * T * p * p]: per image, its 2 x 2 windows of patches row-major,
        the patches row-major inside each, every patch (channel, temporal copy, row, column).
      grid_thw: [N, 3] (1, gh, gw) per image (concrete); every image of one call the same size.
      vision: the tower's config (p = patch_size, T = temporal_patch_size, 2 = spatial_merge_size).
    Returns:
      [N, C, gh * p, gw * p], the first temporal copy of each patch (a still image's copies are
      equal).
    """
    grid = np.asarray(grid_thw)
    sizes = sorted({tuple(int(v) for v in row) for row in grid})
    if len(sizes) != 1 or sizes[0][0] != 1:
        raise ValueError(f"image_grid_thw holds (t, h, w) patch grids {sizes}: one call takes still "
                         "images (t = 1) of one size; call once per size")
    (_, gh, gw), n, m, p = sizes[0], len(grid), vision.spatial_merge_size, vision.patch_size
    t = vision.temporal_patch_size
    c = flat.shape[-1] // (t * p * p)
    if flat.shape != (n * gh * gw, c * t * p * p):
        raise ValueError(f"pixel_values {tuple(flat.shape)} is not {n} images x {gh} x {gw} patches "
                         f"of {t} x {p} x {p} pixels (image_grid_thw)")
    x = jnp.asarray(flat).reshape(n, gh // m, gw // m, m, m, c, t, p, p)[:, :, :, :, :, :, 0]
    return x.transpose(0, 5, 1, 3, 6, 2, 4, 7).reshape(n, c, gh * p, gw * p)


class Qwen2_5_VLForConditionalGeneration(MergedTokens, LlavaForConditionalGeneration):
    """Same call as :class:`LlavaForConditionalGeneration`, with pixel_values [N, C, H, W] at any
    size whose sides are multiples of ``config.vision.merge_unit`` (one size per call) and
    ``position_ids`` [B, T, 3] computed from the image tokens when not given; ``config`` is a
    :class:`Qwen2_5_VLConfig`."""

    config: Qwen2_5_VLConfig

    def new_projector(self) -> nn.Module:
        c = self.config
        return PatchMerger(c.text.hidden_size, c.vision.hidden_size, 1e-6, self.dtype, self.param_dtype)

    def __call__(self, input_ids, pixel_values=None, *args, mm_token_type_ids=None, image_grid_thw=None,
                 **kwargs):
        """:meth:`LlavaForConditionalGeneration.__call__`, also taking Qwen2_5_VLProcessor's
        outputs as they are: ``pixel_values`` flattened [N * gh * gw, C * T * p * p] with
        ``image_grid_thw`` [N, 3] (all N images of one size), ``mm_token_type_ids`` [B, T] (1 on
        image tokens, which they must agree with)."""
        check_type_ids("mm_token_type_ids", mm_token_type_ids, input_ids, self.config.image_token_index)
        if image_grid_thw is not None:
            pixel_values = unflatten_patches(pixel_values, image_grid_thw, self.config.vision)
        elif pixel_values is not None and pixel_values.ndim == 2:
            raise ValueError(f"flattened pixel_values {pixel_values.shape} need the processor's image_grid_thw")
        return super().__call__(input_ids, pixel_values, *args, **kwargs)

    def tokens_per_image(self, pixel_shape: tuple) -> int:
        unit = self.config.vision.merge_unit
        return (pixel_shape[2] // unit) * (pixel_shape[3] // unit)

    def token_grid_of(self, vout) -> tuple:
        return tuple(g // self.config.pool for g in vout.grid)

    def sink_tokens(self, vout):
        """The last block's tokens, before the merger's RMSNorm."""
        return vout.last_hidden_state

    def projector_input(self, selected, vout):
        del selected
        windows = self._windows(vout.last_hidden_state, vout)
        return windows.reshape(windows.shape[:2] + (-1,))

    def llm_positions(self, input_ids, attention_mask, cache, vout):
        return mrope_positions(input_ids, attention_mask, self.config.image_token_index,
                               self.token_grid_of(vout), None if cache is None else cache.position)


registry.register_lvlm("qwen2_5_vl", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)
registry.register_tower(("qwen2_5_vl_vision",), Qwen2_5_VisionTower, read=Qwen2_5_VisionConfig.from_hf,
                        part_of="a Qwen2.5-VL tower alone is not loaded (its checkpoint holds the merger too); "
                                "load the whole model (model_type 'qwen2_5_vl')")
registry.register_llm(("qwen2_5_vl_text",), write=_write_mrope)
