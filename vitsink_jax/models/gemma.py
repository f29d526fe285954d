"""Gemma 3 decoder block (transformers' Gemma3DecoderLayer), numerically equal to transformers'
Gemma3ForCausalLM inside :class:`vitsink_jax.models.llm.DecoderModel`.

Four (1 + w) RMSNorms sandwich the two sub-blocks:
``x + post_attn_norm(attn(input_norm(x)))``, then ``x + post_ff_norm(mlp(pre_ff_norm(x)))``;
each head's queries and keys get a (1 + w) RMSNorm before RoPE and the scores are scaled by
``query_pre_attn_scalar ** -0.5``. Which layers are local (sliding window, their own RoPE base)
and the sqrt(hidden_size) embedding scale are the shared model's business
(``TextConfig.layer_windows``, ``TextConfig.local_rope``).
"""

from __future__ import annotations

from flax import linen as nn

from .attention import DecoderBlock
from .layers import GatedMLP, RMSNorm


class GemmaDecoderLayer(DecoderBlock):
    """Gemma 3's sandwich-norm block."""

    @nn.compact
    def __call__(self, x, mask, cos, sin, output_attentions=False, kv_cache=None, cache_index=None,
                 adjust=None):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: RMSNorm(c.rms_norm_eps, offset=True, name=name, **kw)  # noqa: E731
        h, weights, kv_cache = self.attend(
            norm("input_layernorm")(x), mask, cos, sin, output_attentions, kv_cache, cache_index,
            adjust, qkv_bias=c.qkv_bias, out_bias=c.o_bias, out_name="o_proj",
            qk_norm="gemma_rmsnorm", qk_norm_eps=c.rms_norm_eps,
            scale=c.query_pre_attn_scalar ** -0.5)
        x = x + norm("post_attention_layernorm")(h)
        h = GatedMLP(c, name="mlp", **kw)(norm("pre_feedforward_layernorm")(x))
        return x + norm("post_feedforward_layernorm")(h), weights, kv_cache
