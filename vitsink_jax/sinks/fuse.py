"""Where ViT-sink tokens go in the visual sequence: pure, jit- and vmap-able functions.

The paper's training-free method (Sec. 4.1, "sink-to-the-front") reorders the visual tokens of
each image after the ViT and before the projector so that the ViT sinks come first, each group
keeping its original relative order. A study also needs the opposite ("end"), the stock order
("none") and the input ablations of Finding 5 (sink-only / non-sink-only). All of them are one
stable permutation plus a keep-mask, so every variant has the same static shapes: images with
different sink counts batch together and nothing recompiles per count.

Dropped tokens (select "sinks" / "nonsinks") are moved behind the kept ones and masked out of
attention; with the position shift of :func:`shift_positions` this is exactly the same as
deleting them from the sequence (tested against transformers with the tokens removed).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from .detect import SinkRule

ORDERS = ("none", "front", "end")
SELECTS = ("all", "sinks", "nonsinks")
POSITIONS = ("family", "sequential", "original")


@dataclasses.dataclass(frozen=True)
class VisualTokenPolicy:
    """What the LVLM does with its visual tokens between the ViT and the LLM.

    order: "none" (stock model, exact HF parity), "front" (the paper's sink-to-the-front) or
      "end" (sinks last, the paper's appendix variant).
    select: "all", "sinks" (sink-only input) or "nonsinks" (sinks removed); Finding 5's ablation.
    positions: LLM position ids of the visual tokens. "sequential" (the paper's reading for 1-D
      RoPE): positions follow the new order, as if the permuted features had been written into
      the prompt. "original": every token keeps the position id it had in the stock model
      (dropped tokens leave gaps), i.e. the permutation only changes the causal order; under
      multimodal RoPE (Qwen2.5-VL) each token keeps its own (t, h, w) ids, as the paper notes
      spatial ids must stay. "family" (default): "original" for a multimodal-RoPE LLM,
      "sequential" otherwise (the LVLM's ``policy`` resolves it).
    rule: how sinks are detected on the projector-input features (see :class:`SinkRule`).
    """

    order: str = "none"
    select: str = "all"
    positions: str = "family"
    rule: SinkRule = SinkRule()

    def __post_init__(self):
        for name, value, allowed in (("order", self.order, ORDERS), ("select", self.select, SELECTS),
                                     ("positions", self.positions, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"visual token {name} {value!r} not one of {allowed}")

    @property
    def is_stock(self) -> bool:
        """True when the visual sequence is left exactly as the stock model has it."""
        return self.order == "none" and self.select == "all"


def route_codes_ok(codes) -> jnp.ndarray:
    """Per-image selection codes [B] int -> bool scalar: every code is one of 0, 1, 2.

    Concrete (untraced) codes outside 0..2 raise ValueError naming the first bad code and its
    image; under jit the caller turns a False into a never-silent failure (the LVLM's logits
    become NaN, like a wrong image-token count)."""
    if not isinstance(codes, jax.core.Tracer):
        values = np.asarray(codes)
        bad = np.flatnonzero((values < 0) | (values >= len(SELECTS)))
        if bad.size:
            raise ValueError(f"route code {int(values[bad[0]])} (image {int(bad[0])}) is not one of "
                             + ", ".join(f"{i} ({s})" for i, s in enumerate(SELECTS)))
    return jnp.all((codes >= 0) & (codes < len(SELECTS)))


def keep_mask(sink_mask: jnp.ndarray, select="all") -> jnp.ndarray:
    """sink_mask [B, N] bool -> [B, N] bool, True for the tokens the selection keeps.

    select: one of :data:`SELECTS` for every image, or an int array [B] of per-image codes
    (index into :data:`SELECTS`: 0 all, 1 sinks, 2 nonsinks), e.g. CoT routing decisions.
    Concrete codes outside 0..2 raise (:func:`route_codes_ok`); a traced one keeps no token.
    """
    if isinstance(select, str):
        if select not in SELECTS:
            raise ValueError(f"visual token select {select!r} not one of {SELECTS}")
        select = SELECTS.index(select)
        return {0: jnp.ones_like(sink_mask, dtype=bool), 1: sink_mask, 2: ~sink_mask}[select]
    chex.assert_shape(select, sink_mask.shape[:1])
    route_codes_ok(select)
    code = select[:, None]
    return jnp.where(code == 0, True, jnp.where(code == 1, sink_mask, (code == 2) & ~sink_mask))


def arrange_visual_tokens(sink_mask: jnp.ndarray, order: str = "none", select="all",
                          pinned: int = 0):
    """The stable permutation and keep-mask of one policy.

    Sort key, lexicographic and stable: pinned tokens first, dropped tokens last, then (for
    "front") sinks before non-sinks or (for "end") non-sinks before sinks, then the original
    index.

    Args:
      sink_mask: [B, N] bool ViT-sink mask.
      select: a name of :data:`SELECTS` or per-image codes [B] (see :func:`keep_mask`).
      pinned: (static) leading tokens that keep their slots and are always kept, e.g. a CLS
        token that is neither a sink nor a non-sink patch.
    Returns:
      (perm [B, N] int32: new slot j holds old token perm[j];
       kept [B, N] bool in the new order: False for tokens the selection drops).
    """
    chex.assert_rank(sink_mask, 2)
    if order not in ORDERS:
        raise ValueError(f"visual token order {order!r} not one of {ORDERS}")
    sink = sink_mask.astype(bool)
    pin = jnp.arange(sink.shape[1]) < pinned                                  # [N]
    keep = keep_mask(sink, select) | pin
    group = {"none": jnp.zeros_like(sink, jnp.int32), "front": (~sink).astype(jnp.int32),
             "end": sink.astype(jnp.int32)}[order]
    key = jnp.where(pin, -1, 2 * (~keep).astype(jnp.int32) + group)
    perm = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    return perm, jnp.take_along_axis(keep, perm, axis=-1)


def permute_tokens(x: jnp.ndarray, perm: jnp.ndarray) -> jnp.ndarray:
    """x [B, N, ...] gathered along N by perm [B, N] -> [B, N, ...] (slot j gets x[b, perm[b, j]])."""
    chex.assert_equal_shape_prefix([x, perm], 2)
    idx = perm.reshape(perm.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def shift_positions(position_ids: jnp.ndarray, dropped: jnp.ndarray) -> jnp.ndarray:
    """Position ids as if the dropped tokens had been deleted from the sequence.

    Args:
      position_ids: [B, T] int positions of the full sequence.
      dropped: [B, T] bool, True where a token is removed (it must also be masked from attention).
    Returns:
      [B, T] int32: each position minus the number of dropped tokens before it.
    """
    chex.assert_equal_shape([position_ids, dropped])
    d = dropped.astype(jnp.int32)
    return (position_ids - (jnp.cumsum(d, axis=-1) - d)).astype(jnp.int32)
