"""Data parallelism with one switch: ``mesh`` (jit + NamedSharding over a device Mesh, the
default) or ``pmap`` (the classic data-parallel map). Both split the leading batch axis over all
local devices and replicate the params; both give the numbers of a one-device run.

The same code runs on 1 CPU, on 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and on an accelerator host.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STRATEGIES = ("mesh", "pmap")


def make_mesh(devices=None, axis: str = "data") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices) named ``axis``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (axis,))


def batch_multiple(strategy: str = "mesh") -> int:
    """Batch sizes must be a multiple of this (the number of devices the batch is split over)."""
    return jax.device_count() if strategy == "mesh" else jax.local_device_count()


def replicate(params, strategy: str = "mesh"):
    """Params placed for :func:`data_parallel`: replicated over the mesh (mesh), or left as they
    are (pmap broadcasts them with ``in_axes=None``). Do it once, not per batch."""
    _check_strategy(strategy)
    return jax.device_put(params, NamedSharding(make_mesh(), P())) if strategy == "mesh" else params


def data_parallel(fn: Callable, strategy: str = "mesh") -> Callable:
    """``fn(params, *batch) -> outputs`` (every batch array and output with a leading batch axis)
    -> the same function with the batch split over devices; ``params`` must come from
    :func:`replicate` with the same strategy.

    The batch size must be a multiple of :func:`batch_multiple`; outputs come back with the full
    batch axis.
    """
    _check_strategy(strategy)
    n = batch_multiple(strategy)

    def check(batch):
        for x in batch:
            if x.shape[0] % n:
                raise ValueError(f"batch axis {x.shape[0]} not a multiple of the {n} devices")

    if strategy == "mesh":
        split = NamedSharding(make_mesh(), P("data"))
        jitted = jax.jit(fn)

        def run_mesh(params, *batch):
            check(batch)
            return jitted(params, *[jax.device_put(x, split) for x in batch])

        return run_mesh

    mapped = {}  # number of batch arguments -> pmapped fn (params broadcast, batch split)

    def run_pmap(params, *batch):
        check(batch)
        k = len(batch)
        if k not in mapped:
            mapped[k] = jax.pmap(fn, in_axes=(None,) + (0,) * k)
        out = mapped[k](params, *[np.asarray(x).reshape((n, -1) + x.shape[1:]) for x in batch])
        return jax.tree_util.tree_map(lambda y: y.reshape((-1,) + y.shape[2:]), out)

    return run_pmap


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel strategy {strategy!r} not one of {STRATEGIES}")
