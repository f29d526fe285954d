"""Vision-language connector: LLaVA's ``linear`` and ``mlp2x_gelu`` projectors.

Parameter names follow transformers' LlavaMultiModalProjector (``linear_1``, ``linear_2``).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from .layers import activation


class MLPProjector(nn.Module):
    """[..., E_vision] -> [..., D_llm]. ``kind``: "mlp2x_gelu" (Linear-act-Linear) or "linear"."""

    out_features: int
    kind: str = "mlp2x_gelu"
    act: str = "gelu"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.Dense(self.out_features, use_bias=self.use_bias,  # noqa: E731
                                      dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if self.kind == "linear":
            return dense("linear_1")(x)
        if self.kind != "mlp2x_gelu":
            raise ValueError(f"unknown projector kind {self.kind!r}")
        return dense("linear_2")(activation(self.act)(dense("linear_1")(x)))


class Reweighter(nn.Module):
    """DIYSink's ReW MLP: question embedding q [B, D] -> (w_sink, w_nonsink) [B, 2].

    Dense(hidden) -> GELU -> Dense(2, zero-initialised) -> 2 * softmax, so it starts at (1, 1),
    the dual projector without reweighting, and the two weights always sum to 2.
    """

    hidden: int = 64
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q):
        h = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="fc1")(q), approximate=False)
        logits = nn.Dense(2, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.initializers.zeros, name="fc2")(h)
        return 2.0 * nn.softmax(logits.astype(jnp.float32), axis=-1)
