"""One multi-head attention shared by the ViT (bidirectional) and the LLM (causal, GQA, RoPE).

Shapes: B batch, T queries, S keys, H query heads, K key/value heads (H % K == 0), D head dim.
Scores, mask and softmax are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import RMSNorm
from .rope import apply_rotary

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def same_block(q_blocks, k_blocks):
    """[B, T, S] bool: query and key lie in the same image block (Gemma 3's bidirectional
    image attention); q_blocks [B, T], k_blocks [B, S] hold the block id, -1 outside blocks."""
    return (q_blocks[:, :, None] == k_blocks[:, None, :]) & (q_blocks[:, :, None] >= 0)


def window_mask(keep, q_slots, s: int, window: int):
    """[B or 1, T, S] bool: key slot k is fewer than ``window`` kept tokens behind the query at
    slot q (slots ``q_slots`` [T]). keep [B, S] (1 = a token; None: every slot) counts tokens, so
    tokens deleted from the middle of a row (a visual-token selection) or padding never take
    room in the window, as they would not if they were really gone; for a row without holes the
    distance is the slot distance."""
    if keep is None:
        return (q_slots[:, None] - jnp.arange(s)[None, :] < window)[None]
    rank = jnp.cumsum(keep.astype(jnp.int32), axis=1)                          # [B, S]
    return rank[:, q_slots][:, :, None] - rank[:, None, :] < window


def make_attention_mask(attention_mask: Optional[jnp.ndarray], q_len: int, kv_len: int,
                        causal: bool, window: Optional[int] = None,
                        blocks: Optional[jnp.ndarray] = None) -> Optional[jnp.ndarray]:
    """Boolean mask [B or 1, 1, T, S] (True = may attend) from a padding mask [B, S] of 1/0.

    Causal masking aligns the last query with the last key (queries are the newest positions);
    ``blocks`` [B, T] (T = S; causal only) also opens each image block to itself
    (:func:`same_block`); ``window`` (sliding-window attention, causal only) hides keys
    ``window`` or more tokens back, counting only the tokens the padding mask keeps
    (:func:`window_mask`). Returns None when nothing is masked.
    """
    mask = None
    if causal:
        q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        mask = (q_pos >= jnp.arange(kv_len)[None, :])[None, None]
        if blocks is not None:
            mask = mask | same_block(blocks, blocks)[:, None]
        if window is not None:
            mask = mask & window_mask(attention_mask, q_pos[:, 0], kv_len, window)[:, None]
    if attention_mask is not None:
        pad = attention_mask.astype(bool)[:, None, None, :]
        mask = pad if mask is None else jnp.logical_and(mask, pad)
    return mask


# how attention runs where no attention weights are read (analysis, FastV's ranking layer and
# VAR always run "explicit"): "xla" jax.nn.dot_product_attention's XLA path (one fused einsum -
# softmax - einsum; the default), "cudnn" its cuDNN flash kernel (GPU, bf16 / fp16 only),
# "splash" the Pallas TPU splash-attention kernel (:func:`splash_attention`; interpreted off
# TPU), "explicit" the einsum - softmax - einsum of :func:`dot_product_attention`
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "explicit")


def check_impl(impl: str) -> str:
    """``impl`` when it is one of :data:`ATTENTION_IMPLS`, else ValueError naming them."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} not one of {ATTENTION_IMPLS}")
    return impl


SPLASH_BLOCK = 128  # the splash kernel's query / key block: sequences are padded to a multiple


def splash_attention(q, k, v, mask=None, scale: Optional[float] = None, interpret: Optional[bool] = None):
    """Softmax attention by the Pallas TPU splash-attention kernel
    (``jax.experimental.pallas.ops.tpu.splash_attention``), with grouped key/value heads.

    q: [B, T, H, D]; k, v: [B, S, K, D]; mask: bool broadcastable to [B, 1, T, S] (any mask:
    causal, padding, windows, Gemma 3's image blocks), None = every key. Each row and key/value
    head runs the multi-query kernel of its H / K query heads under a dynamic mask (block
    sparsity read from the mask at run time); T and S are padded to multiples of
    :data:`SPLASH_BLOCK` with masked keys and the padded queries dropped. A query that may
    attend to no key (a left pad) gets another average of the values than the explicit path
    gives it: no real token reads it. ``interpret``: run the kernel in Pallas' interpreter (default: off a
    TPU). Returns [B, T, H, D] in q.dtype."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    tp, sp = -t % SPLASH_BLOCK, -s % SPLASH_BLOCK
    full = jnp.ones((b, 1, t, s), bool) if mask is None else jnp.broadcast_to(mask, (b, 1, t, s))
    full = jnp.pad(full[:, 0], ((0, 0), (0, tp), (0, sp)))                    # [B, T', S']
    qh = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, tp), (0, 0), (0, 0)))
    qh = qh.reshape(b, t + tp, kh, g, d).transpose(0, 2, 3, 1, 4)              # [B, K, G, T', D]
    kv = lambda x: jnp.pad(x, ((0, 0), (0, sp), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731

    def row(q_r, k_r, v_r, m_r):  # [K, G, T', D], [K, S', D] x 2, [T', S']
        kernel = splash.make_splash_mqa_single_device(
            jnp.broadcast_to(m_r, (g,) + m_r.shape), interpret=interpret,
            block_sizes=splash.BlockSizes(*(SPLASH_BLOCK,) * 8))
        return jax.vmap(kernel)(q_r, k_r, v_r)
    out = jax.vmap(row)(qh, kv(k), kv(v), full)                                # [B, K, G, T', D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t + tp, h, d)[:, :t].astype(q.dtype)


def dot_product_attention(q, k, v, mask=None, scale: Optional[float] = None,
                          adjust: Optional[Callable] = None, impl: str = "explicit"):
    """Softmax attention with grouped key/value heads.

    Args:
      q: [B, T, H, D]; k, v: [B, S, K, D]; mask: bool, broadcastable to [B, 1, T, S];
      adjust: optional fn on the probabilities [B, H, T, S] before they weigh the values (VAR).
      impl: one of :data:`ATTENTION_IMPLS`; all but "explicit" return no weights and need
        ``adjust`` None.
    Returns:
      (out [B, T, H, D] in v.dtype, weights [B, H, T, S] float32, or None but with "explicit").
    """
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"query heads {h} not a multiple of key/value heads {kh}")
    g = h // kh
    scale = d ** -0.5 if scale is None else scale
    if check_impl(impl) != "explicit":
        if adjust is not None:
            raise ValueError(f"attention_impl {impl!r} cannot adjust the attention probabilities")
        common = jnp.result_type(q, k, v)  # the kernels take one dtype (a cache may hold another)
        q_, k_, v_ = (x.astype(common) for x in (q, k, v))
        if impl == "splash":
            return splash_attention(q_, k_, v_, mask, scale).astype(v.dtype), None
        return jax.nn.dot_product_attention(q_, k_, v_, mask=mask, scale=scale,
                                            implementation=impl).astype(v.dtype), None
    qg = q.reshape(b, t, kh, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(b, h, t, s)
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    weights = nn.softmax(scores, axis=-1)
    if adjust is not None:
        weights = adjust(weights)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.reshape(b, kh, g, t, s).astype(v.dtype), v)
    return out.reshape(b, t, h, d), weights


class Attention(nn.Module):
    """q/k/v/out projections named as in transformers, optional RoPE and returned weights."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = True
    out_bias: bool = True
    out_name: str = "out_proj"  # CLIP/SigLIP: out_proj, LLaMA/Qwen2: o_proj
    impl: str = "xla"  # one of ATTENTION_IMPLS where no weights are read (else "explicit")
    qk_norm: Optional[str] = None  # a norm of q and k: one of QK_NORMS ("rmsnorm": over all
    # heads at once, before the split into heads; the others per head)
    qk_norm_eps: float = 1e-6
    scale: Optional[float] = None  # of the scores; None: head_dim ** -0.5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, rope: Optional[Callable] = None,
                 output_attentions: bool = False, kv_cache=None, cache_index=None,
                 adjust: Optional[Callable] = None):
        """x: [B, T, E] -> ([B, T, E], weights [B, H, T, S] or None, new kv_cache or None).
        ``adjust``: see :func:`dot_product_attention`.

        kv_cache: (keys, values) each [B, S, K, D]; this call's keys and values are written at
        slot ``cache_index`` and the queries attend over all S slots (``mask`` [B, 1, T, S]).
        """
        dense = lambda n, heads, bias, name: nn.Dense(  # noqa: E731
            n * heads, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        b, t, e = x.shape
        q = dense(self.head_dim, self.num_heads, self.qkv_bias, "q_proj")(x)
        k = dense(self.head_dim, self.num_kv_heads, self.qkv_bias, "k_proj")(x)
        v = dense(self.head_dim, self.num_kv_heads, self.qkv_bias, "v_proj")(x)
        if self.qk_norm == "rmsnorm":  # over all heads at once, before the split
            q, k = self._qk_norm("q")(q), self._qk_norm("k")(k)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm is not None and self.qk_norm != "rmsnorm":  # each head's own
            q, k = self._qk_norm("q")(q), self._qk_norm("k")(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        if kv_cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), start)
            kv_cache = (k, v)
        impl = "explicit" if output_attentions or adjust is not None else self.impl
        out, weights = dot_product_attention(q, k, v, mask, self.scale, adjust, impl)
        out = out.reshape(b, t, self.num_heads * self.head_dim)
        out = nn.Dense(e, use_bias=self.out_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=self.out_name)(out)
        return out, (weights if output_attentions else None), kv_cache

    def _qk_norm(self, which: str) -> nn.Module:
        """The norm of ``which`` ("q" or "k") heads, named as in transformers."""
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm {self.qk_norm!r} not one of {sorted(QK_NORMS)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=f"{which}_{QK_NORMS[self.qk_norm]}")
        if self.qk_norm == "layernorm":
            return nn.LayerNorm(self.qk_norm_eps, **kw)
        return RMSNorm(self.qk_norm_eps, offset=self.qk_norm == "gemma_rmsnorm", **kw)


# q / k norm kind -> the name of its modules after "q_" / "k_": Phi-2's qk_layernorm and Gemma 3's
# (1 + w) RMSNorm of each head; InternViT's RMSNorm of all heads' q (k) together
QK_NORMS = {"layernorm": "layernorm", "gemma_rmsnorm": "norm", "rmsnorm": "norm"}


class DecoderBlock(nn.Module):
    """Base of the LLM decoder layers (llm.DecoderLayer, phi.PhiDecoderLayer,
    gemma.GemmaDecoderLayer), all called as
    (x [B, T, D], mask, cos, sin, output_attentions, kv_cache, cache_index, adjust) -> (x [B, T, D],
    weights [B, H, T, S] or None, kv_cache); :meth:`attend` is their rotary self-attention."""

    config: Any  # a TextConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"  # one of ATTENTION_IMPLS

    def attend(self, h, mask, cos, sin, output_attentions, kv_cache, cache_index, adjust, **options):
        """``self_attn`` on the normed input h [B, T, D] with RoPE from (cos, sin); ``options``
        are the family's Attention fields (biases, output name, q/k norm)."""
        c = self.config
        return Attention(c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                         impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="self_attn", **options)(
            h, mask, lambda t: apply_rotary(t, cos, sin), output_attentions, kv_cache, cache_index,
            adjust)
