"""The skeleton every vision tower shares: the pixel check, the layer loop (:class:`Encoder`,
:func:`layer_loop`), test-time registers (appended zero tokens, their MLP edit, dropped from the
outputs) and the tower's output. The blocks' parts are in :mod:`vitsink_jax.models.layers`."""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax.numpy as jnp
from flax import linen as nn

from ..config import VisionConfig
from ..interventions import TestTimeRegisters
from ..interventions.registers import move_to_registers
from ..parallel import constrain_rows
from .layers import ConfigModule
from .outputs import VisionOutput


def check_pixels(config: VisionConfig, pixel_values) -> None:
    """Raises ValueError naming the shape unless pixel_values is [B, C, S, S] at the tower's
    channels and image size."""
    expected = (config.num_channels, config.image_size, config.image_size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                         f"[B, {', '.join(map(str, expected))}] for this {config.model_type}")


def active(ttr: Optional[TestTimeRegisters]) -> bool:
    """Test-time registers are on (a config with at least one neuron)."""
    return ttr is not None and len(ttr.neurons) > 0


def with_registers(x, ttr: Optional[TestTimeRegisters]):
    """Appends the test-time registers (zeros) to the tokens [B, N, E] -> [B, N + R, E]."""
    if not active(ttr):
        return x
    return jnp.concatenate([x, jnp.zeros((x.shape[0], ttr.registers, x.shape[2]), x.dtype)], 1)


def without_registers(ttr: Optional[TestTimeRegisters], last, states, attns):
    """Drops the test-time registers from the tower's outputs (attention to them left out)."""
    if not active(ttr):
        return last, states, attns
    r = ttr.registers
    return (last[:, :-r], tuple(s[:, :-r] for s in states),
            tuple(None if a is None else a[:, :, :-r, :-r] for a in attns))


def register_edit(ttr: Optional[TestTimeRegisters], layer: int, config: VisionConfig):
    """The MLP activation edit of ``layer`` (None when it has no register neuron)."""
    if not active(ttr):
        return None
    neurons = [n for at, n in ttr.neurons if at == layer]
    if not neurons:
        return None
    return partial(move_to_registers, neurons=tuple(neurons), registers=ttr.registers,
                   prefix=config.prefix_tokens, scale=ttr.scale, value=ttr.value)


class VisionTower(ConfigModule):
    """The fields of every tower module (the LVLM builds any tower with them):
    ``__call__(pixel_values [B, C, H, W], output_hidden_states, output_attentions)`` ->
    VisionOutput."""

    test_time_registers: Optional[TestTimeRegisters] = None


def layer_loop(x, num_layers: int, step) -> tuple:
    """x [B, N, E] through ``step(i, x) -> (x, weights)`` for each layer i -> (last [B, N, E],
    hidden_states L+1 x [B, N, E] (the input first), attentions L x [B, H, N, N] or None)."""
    states, attns = [x], []
    for i in range(num_layers):
        x, w = step(i, x)
        states.append(x)
        attns.append(w)
    return x, tuple(states), tuple(attns)


class Encoder(nn.Module):
    """The tower's blocks as a loop: ``layer`` (a block class called (x, output_attentions, MLP
    edit) -> (x, weights)) named ``{layer_name}_{i}`` as HF's ``encoder.layers.i`` (CLIP /
    SigLIP) or ``encoder.layer.i`` (DINOv2, InternViT)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    test_time_registers: Optional[TestTimeRegisters] = None
    layer: Optional[type] = None  # required
    layer_name: str = "layers"

    @nn.compact
    def __call__(self, x, output_attentions=False):
        """Returns (last [B, N, E], hidden_states L+1 x [B, N, E], attentions L x [B, H, N, N])."""
        def step(i, x):
            x, w = self.layer(self.config, self.dtype, self.param_dtype, name=f"{self.layer_name}_{i}")(
                x, output_attentions, register_edit(self.test_time_registers, i, self.config))
            return constrain_rows(x), w

        return layer_loop(x, self.config.num_hidden_layers, step)


def encode(x, config: VisionConfig, ttr: Optional[TestTimeRegisters], output_attentions: bool,
           dtype, param_dtype, **encoder_fields) -> tuple:
    """The calling tower's :class:`Encoder` ("encoder") on tokens x [B, N (+ R), E] that hold
    the test-time registers already (:func:`with_registers`) -> (last, hidden_states,
    attentions), the registers dropped."""
    out = Encoder(config, dtype, param_dtype, ttr, name="encoder", **encoder_fields)(x, output_attentions)
    return without_registers(ttr, *out)


def tower_output(last, pooled, states, attns, output_hidden_states: bool, output_attentions: bool,
                 **extra) -> VisionOutput:
    """VisionOutput with the hidden states and attentions when asked for."""
    return VisionOutput(last_hidden_state=last, pooler_output=pooled,
                        hidden_states=states if output_hidden_states else None,
                        attentions=attns if output_attentions else None, **extra)
