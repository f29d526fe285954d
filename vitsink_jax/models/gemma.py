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

from ..config import TextConfig, hf_rope, rope_fields
from . import registry
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


def _gemma3_text_fields(c) -> dict:
    """Gemma 3's own keys: per-layer kinds, the local layers' window and RoPE base (the global
    layers' RoPE is TextConfig's), the query scale, the logit cap, ``hidden_activation``."""
    if getattr(c, "use_bidirectional_attention", False):
        raise ValueError("gemma3_text with use_bidirectional_attention=true (an embedding "
                         "model) is not supported")
    rope = hf_rope(c)
    local = dict(rope["sliding_attention"])
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"gemma3_text sliding_attention rope_type {local['rope_type']!r}: "
                         "only plain RoPE is implemented for the local layers")
    return dict(**rope_fields(rope["full_attention"], getattr(c, "rope_theta", 10000.0)),
                hidden_act=c.hidden_activation, sliding_window=getattr(c, "sliding_window", None),
                layer_types=tuple(c.layer_types), query_pre_attn_scalar=c.query_pre_attn_scalar,
                rope_local_theta=float(local["rope_theta"]),
                final_logit_softcapping=getattr(c, "final_logit_softcapping", None))


def _write_gemma3_text(config: TextConfig, d: dict) -> None:
    rope = {k: v for k, v in config.rope.items() if k != "partial_rotary_factor"}
    full = {"rope_type": "default", **rope, "rope_theta": d.pop("rope_theta")}
    d.pop("rope_scaling", None)
    d["hidden_activation"] = d.pop("hidden_act")
    d.update(rope_parameters={"full_attention": full, "sliding_attention": {
                 "rope_type": "default", "rope_theta": config.rope_local_theta}},
             sliding_window=config.sliding_window, layer_types=list(config.layer_types),
             query_pre_attn_scalar=config.query_pre_attn_scalar,
             final_logit_softcapping=config.final_logit_softcapping, attention_bias=config.attention_bias)


registry.register_llm(("gemma3_text",), fields=_gemma3_text_fields, write=_write_gemma3_text)
