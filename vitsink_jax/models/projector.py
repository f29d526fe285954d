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
