"""Parallelism with one switch: ``mesh`` (jit + NamedSharding over a device Mesh, the default)
or ``pmap`` (the classic data-parallel map). Both split the leading batch axis over the devices
and give the numbers of a one-device run.

The mesh has two axes, ``data`` and ``fsdp``: the batch is split over both, and params (and
optimizer state) above a size threshold are sharded over ``fsdp`` along their largest divisible
dimension (ZeRO-3 style; XLA inserts the gathers). ``fsdp=1`` is pure data parallelism. The same
code runs on 1 CPU, on 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``),
on an accelerator host and on several hosts (``jax.distributed``; batches are built from each
host's own rows with :func:`global_batch`). Tensor parallelism is not implemented.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STRATEGIES = ("mesh", "pmap")


BATCH = P(("data", "fsdp"))  # the batch axis is split over every device


def make_mesh(fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over all devices; ``fsdp`` must divide the device count."""
    n = jax.device_count()
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
    return Mesh(np.asarray(jax.devices()).reshape(n // fsdp, fsdp), ("data", "fsdp"))


def fsdp_shardings(tree, mesh: Mesh, min_size: int = 2 ** 14):
    """NamedSharding per leaf: arrays of at least ``min_size`` elements sharded over ``fsdp``
    along their largest dimension divisible by the axis size; the rest replicated."""
    k = mesh.shape["fsdp"]

    def one(x):
        dims = [d for d in np.argsort(x.shape)[::-1] if x.shape[d] % k == 0]
        if k == 1 or x.size < min_size or not dims:
            return NamedSharding(mesh, P())
        spec = [None] * len(x.shape)
        spec[int(dims[0])] = "fsdp"
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map(one, tree)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Host-local batch arrays (this host's rows) -> global jax Arrays split over the mesh."""
    sharding = NamedSharding(mesh, BATCH)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def batch_multiple(strategy: str = "mesh") -> int:
    """Batch sizes must be a multiple of this (the number of devices the batch is split over)."""
    return jax.device_count() if strategy == "mesh" else jax.local_device_count()


def replicate(params, strategy: str = "mesh"):
    """Params placed for :func:`data_parallel`: replicated over the mesh (mesh), or left as they
    are (pmap broadcasts them with ``in_axes=None``). Do it once, not per batch."""
    _check_strategy(strategy)
    return jax.device_put(params, NamedSharding(make_mesh(), P())) if strategy == "mesh" else params


def stack_for_pmap(tree):
    """One copy of every leaf per local device (the leading axis pmap maps over)."""
    n = jax.local_device_count()
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n,) + x.shape), tree)


def split_for_pmap(batch: dict) -> dict:
    """[B, ...] -> [local devices, B / devices, ...] for every array of a batch."""
    n = jax.local_device_count()
    for k, x in batch.items():
        if x.shape[0] % n:
            raise ValueError(f"batch {k!r} axis {x.shape[0]} not a multiple of the {n} devices")
    return {k: np.asarray(x).reshape((n, -1) + x.shape[1:]) for k, x in batch.items()}


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
        split = NamedSharding(make_mesh(), BATCH)
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
