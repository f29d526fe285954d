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

from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ..config import Qwen2_5_VisionConfig, Qwen2_5_VLConfig
from ..interventions import TestTimeRegisters
from . import registry
from .attention import dot_product_attention
from .layers import GatedMLP, RMSNorm, activation
from .lvlm import LlavaForConditionalGeneration
from .merge import MergedTokens, check_type_ids
from .outputs import VisionOutput
from .rope import apply_rotary


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


class Qwen2_5_VisionAttention(nn.Module):
    """One fused ``qkv`` projection, 2-D RoPE on q and k (turned in float32, as transformers
    does), ``proj`` out (HF's names)."""

    config: Qwen2_5_VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

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


class Qwen2_5_VisionBlock(nn.Module):
    """x + attn(norm1(x)); x + mlp(norm2(x)) with RMSNorms and a gated MLP with biases."""

    config: Qwen2_5_VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, window, cos, sin, output_attentions=False):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h, weights = Qwen2_5_VisionAttention(c, name="attn", **kw)(
            RMSNorm(c.layer_norm_eps, name="norm1", **kw)(x), window, cos, sin, output_attentions)
        x = x + h
        return x + GatedMLP(c, name="mlp", **kw)(RMSNorm(c.layer_norm_eps, name="norm2", **kw)(x)), weights


class PatchEmbed(nn.Module):
    """``proj``: a bias-free Conv3d over (frames, rows, columns) of one patch, as transformers'
    Qwen2_5_VisionPatchEmbed: [M, tp, p, p, C] -> [M, 1, 1, 1, E]."""

    config: Qwen2_5_VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

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


@registry.tower("qwen2_5_vl")
class Qwen2_5_VisionTower(nn.Module):
    """``__call__(pixel_values [N, C, H, W])`` -> VisionOutput over the gh x gw patches
    (row-major): ``hidden_states`` = the patch embeddings then every block's output,
    ``last_hidden_state`` = the last block's (the merger normalises it), ``grid`` = (gh, gw).
    Each image is one sequence; windowed blocks attend inside their window only."""

    config: Qwen2_5_VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    test_time_registers: Optional[TestTimeRegisters] = None

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
        states, attns = [x], []
        for i in range(c.num_hidden_layers):
            x, w = Qwen2_5_VisionBlock(c, self.dtype, self.param_dtype, name=f"blocks_{i}")(
                x, None if i in c.full_attention_layers else window, cos, sin, output_attentions)
            states.append(x)
            attns.append(w)
        return VisionOutput(last_hidden_state=x, pooler_output=None,
                            hidden_states=tuple(states) if output_hidden_states else None,
                            attentions=tuple(attns) if output_attentions else None, grid=grid)


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
    :class:`~vitsink_jax.config.Qwen2_5_VLConfig`."""

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
