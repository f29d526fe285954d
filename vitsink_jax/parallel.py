"""Parallelism with one switch: ``mesh`` (jit + NamedSharding over a device Mesh, the default)
or ``pmap`` (the classic data-parallel map). Both split the leading batch axis over the devices
and give the numbers of a one-device run.

The mesh has three axes, ``data``, ``fsdp`` and ``tensor``. The batch is split over data x fsdp.
Params (and the optimizer state, which mirrors their paths) are placed by :func:`param_shardings`:
first the rules table (:data:`TENSOR_RULES`, path regex -> logical spec, Megatron-style: q/k/v/
gate/up/fc1/linear_1 (and Qwen2.5-VL's fused qkv / merger mlp.0) column-parallel,
o/down/out_proj/fc2/linear_2/Phi's dense/InternViT's projection_layer (Qwen2.5-VL's attn proj /
merger mlp.2) row-parallel, embeddings and
LM head over the vocabulary) puts
``tensor`` on one dimension, then arrays above a size threshold get ``fsdp`` on their largest
remaining divisible dimension (ZeRO-3 style). XLA inserts the collectives; the models keep their
activations split over the batch axes (:func:`constrain_rows`) so that those are weight
all-gathers, not gathers of the whole batch's rows. ``fsdp=1, tensor=1``
is pure data parallelism. :func:`make_mesh` lays the devices out topology-aware
(``jax.experimental.mesh_utils``): tensor, then fsdp, on neighbouring chips of one slice, and
with ``dcn_data`` slices (multi-slice TPU) the data axis across them over the data-centre
network; CPU devices keep their enumeration order. The same code runs on 1 CPU, on 8 fake CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on an accelerator host and on
several hosts: :func:`init_distributed` starts ``jax.distributed`` from a configured
coordinator or, with none, from the launcher's environment (TPU VM / pod, SLURM, mpirun;
:func:`distributed_plan`), and batches are built from each host's own rows with
:func:`global_batch`.
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STRATEGIES = ("mesh", "pmap")


BATCH = P(("data", "fsdp"))  # the batch axis is split over every device
MIN_SPLIT_SIZE = 2 ** 14  # params with fewer elements stay whole on every device


TENSOR_RULES = (  # param path (regex on "a/b/c") -> which dimension carries "tensor"
    # column parallel: LLM attention / MLP in, ViT MLP in (fc1), projector in (linear_1)
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|linear_1|attn/qkv|mlp/0)/kernel$", (None, "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|linear_1|attn/qkv|mlp/0)/bias$", ("tensor",)),
    # row parallel: the matching outputs (LLM o_proj / down_proj, ViT out_proj / fc2, linear_2)
    (r"(o_proj|down_proj|out_proj|fc2|linear_2|self_attn/dense|projection_layer|attn/proj|mlp/2)/kernel$",
     ("tensor", None)),
    (r"embed_tokens/embedding$", ("tensor", None)),                           # vocabulary
    (r"lm_head/kernel$", (None, "tensor")),
    (r"lm_head/bias$", ("tensor",)),
)


def device_grid(fsdp: int = 1, devices=None, tensor: int = 1, dcn_data: int = 1) -> np.ndarray:
    """``devices`` (default: all) as an array [data, fsdp, tensor] of devices for :func:`make_mesh`.

    One slice (``dcn_data=1``): ``jax.experimental.mesh_utils.create_device_mesh``, which on TPU
    puts the tensor axis, then fsdp, on chips that are neighbours on the interconnect (ICI) and
    on CPU keeps the enumeration order (GPUs: sorted by id). ``dcn_data`` slices: the data axis
    spans them over the data-centre network (``create_hybrid_device_mesh``): each slice holds
    data / dcn_data rows of the grid laid out as one slice's, so fsdp and tensor never leave a
    slice. Slices are the devices' ``slice_index`` (multi-slice TPU), or their processes where
    devices have none (several GPU hosts). ``fsdp x tensor`` must divide the devices of a slice."""
    devices = jax.devices() if devices is None else list(devices)
    for name, value in (("fsdp", fsdp), ("tensor", tensor), ("dcn_data", dcn_data)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    granule = "slice_index" if hasattr(devices[0], "slice_index") else "process_index"
    slices = len({getattr(d, granule) for d in devices})
    what = "slices" if granule == "slice_index" else "processes"
    if dcn_data > 1 and slices != dcn_data:
        raise ValueError(f"dcn_data={dcn_data} must equal the number of {what} the devices come "
                         f"from ({slices}): only the data axis crosses them")
    if dcn_data == 1 and slices > 1 and devices[0].platform == "tpu":
        raise ValueError(f"the devices come from {slices} slices: set dcn_data={slices} (the data "
                         "axis over the data-centre network; fsdp and tensor stay in a slice)")
    per_slice = len(devices) // dcn_data
    if per_slice % (fsdp * tensor):
        raise ValueError(f"fsdp={fsdp} x tensor={tensor} does not divide the {per_slice} devices"
                         + (f" of each of the dcn_data={dcn_data} {what}" if dcn_data > 1 else ""))
    inner = (per_slice // (fsdp * tensor), fsdp, tensor)
    if dcn_data == 1:  # (a physical axis is split only where no product of whole ones fits)
        return mesh_utils.create_device_mesh(inner, devices, allow_split_physical_axes=True)
    return mesh_utils.create_hybrid_device_mesh(inner, (dcn_data, 1, 1), devices,
                                                process_is_granule=granule == "process_index",
                                                allow_split_physical_axes=True)


def make_mesh(fsdp: int = 1, devices=None, tensor: int = 1, dcn_data: int = 1) -> Mesh:
    """A (data, fsdp, tensor) Mesh over ``devices`` (default: all), laid out by
    :func:`device_grid` (errors there name the setting)."""
    return Mesh(device_grid(fsdp, devices, tensor, dcn_data), ("data", "fsdp", "tensor"))


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def param_shardings(tree, mesh: Mesh, rules=TENSOR_RULES, min_size: int = MIN_SPLIT_SIZE):
    """NamedSharding per leaf of a param tree (or of anything holding param-shaped leaves under
    the same paths, like an optimizer state): ``tensor`` from the first matching rule when that
    dimension divides evenly, then ``fsdp`` on the largest remaining divisible dimension of
    arrays with at least ``min_size`` elements; everything else replicated. Scanned layers
    (``.../layers/...``, a leading [L] axis) get the same specs behind an unsplit layer axis,
    so each scan step gathers one layer."""
    t, k = mesh.shape["tensor"], mesh.shape["fsdp"]

    def one(keys, x):
        spec = [None] * len(x.shape)
        path = _path(keys)
        lead = 1 if re.search(r"(^|/)layers/", path) else 0  # scanned layers: [L, ...], L unsplit
        for pattern, logical in rules:
            if t > 1 and re.search(pattern, path) and len(logical) + lead == len(x.shape):
                dim = lead + logical.index("tensor")
                if x.shape[dim] % t == 0:
                    spec[dim] = "tensor"
                break
        free = [d for d in np.argsort(x.shape)[::-1]
                if d >= lead and spec[d] is None and x.shape[d] % k == 0]
        if k > 1 and x.size >= min_size and free:
            spec[int(free[0])] = "fsdp"
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(one, tree)


def _training_mesh():
    """The mesh in context (``jax.set_mesh`` or ``jax.sharding.use_abstract_mesh``, as the
    training step of ``train_lib.make_train_step(mesh=...)`` sets it) when it has the batch axes
    and none of them is manual (inside ``shard_map`` each device already holds its own rows);
    else None."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = BATCH[0]
    if mesh.empty or not set(axes) <= set(mesh.axis_names) or set(axes) & set(mesh.manual_axes):
        return None
    return mesh


def constrain_rows(x):
    """``x`` [B, ...] split over the batch axes (data x fsdp) of the training mesh in context
    (:func:`_training_mesh`), so that XLA gathers fsdp-sharded weights (ZeRO-3) rather than the
    rows of the whole batch; ``x`` unchanged without one, or when B does not split evenly."""
    mesh, axes = _training_mesh(), BATCH[0]
    n = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in axes]))
    if n == 1 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))


def whole(w):
    """``w`` whole on every device of the training mesh in context (:func:`_training_mesh`): an
    all-gather of one sharded weight where it is used (ZeRO-3), for ops such as an embedding
    lookup where XLA would otherwise gather the rows of the whole batch (memory growing with
    the global batch); ``w`` unchanged without one."""
    return w if _training_mesh() is None else jax.lax.with_sharding_constraint(w, P())


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Host-local batch arrays (this host's rows) -> global jax Arrays split over the mesh."""
    sharding = NamedSharding(mesh, BATCH)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def local_rows(x: jax.Array) -> np.ndarray:
    """[local rows] global row indices of the batch array ``x`` (from :func:`global_batch`) that
    this process's local rows became, in their local order: its devices' blocks of the batch
    axis, ascending (as ``make_array_from_process_local_data`` fills them). One contiguous run
    when the mesh takes the devices in process order; on a TPU pod the topology-aware mesh may
    interleave the hosts' blocks."""
    blocks = {idx[0].indices(x.shape[0])[:2]
              for idx in x.sharding.addressable_devices_indices_map(x.shape).values()}
    return np.concatenate([np.arange(a, b) for a, b in sorted(blocks)])


def process_rows(batch_size: int, index: int = None, count: int = None) -> slice:
    """The rows of a global batch that process ``index`` of ``count`` (default: this one of
    all) passes to :func:`global_batch`: the index-th of ``count`` equal contiguous slices (the
    mesh decides where they land in the global batch: :func:`local_rows`)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if batch_size % count:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {count} processes")
    per = batch_size // count
    return slice(index * per, (index + 1) * per)


def batch_multiple(strategy: str = "mesh") -> int:
    """Host-local batch sizes must be a multiple of this (this host's devices)."""
    _check_strategy(strategy)
    return jax.local_device_count()


DISTRIBUTED_MODES = ("auto", "off")

# The launchers whose environment jax.distributed.initialize() reads its arguments from
# (jax._src.clusters), in the order it tries them before Cloud TPU VMs: (name, the variables it
# needs, the variable holding the process count, the one holding this process's id). Left out:
# mpi4py (opt-in, it needs cluster_detection_method) and Kubernetes (JAX asks the cluster's API,
# which a one-pod run may not be allowed to read).
LAUNCHERS = (
    ("Open MPI (mpirun)", ("OMPI_MCA_orte_hnp_uri",), "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("SLURM", ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID"), "SLURM_NTASKS", "SLURM_PROCID"),
)


def launcher(environ, tpu_vm: bool = False) -> str | None:
    """The name of the launcher that started this process as one of several, read from
    ``environ`` (a mapping like ``os.environ``) as JAX's cluster detection reads it, or None.

    A Cloud TPU VM (``tpu_vm``: JAX found TPU chips and libtpu at import) counts whether one host
    or a pod: JAX asks the VM's metadata server (GCE) or ``TPU_WORKER_HOSTNAMES`` (GKE) for the
    hosts, and one host makes a one-process run. A launcher's job of one process (``srun -n 1``,
    ``mpirun -n 1``) counts as none: JAX would limit the process to one local device."""
    for name, needs, count, _ in LAUNCHERS:
        if all(v in environ for v in needs) and int(environ[count]) > 1:
            return name
    if tpu_vm:
        gke = "TPU_WORKER_HOSTNAMES" in environ or "TPU_PROCESS_ADDRESSES" in environ
        return "Cloud TPU VM (GKE)" if gke else "Cloud TPU VM"
    return None


def distributed_plan(d, environ, tpu_vm: bool = False) -> tuple[dict | None, str]:
    """(the keyword arguments of ``jax.distributed.initialize``, or None for a one-process run;
    one line saying which) for the config's ``distributed`` block ``d``:

    * ``d.coordinator`` set ("host:port"): that coordinator with ``d.num_processes`` and
      ``d.process_id`` (every process is started by hand);
    * otherwise, with ``d.mode == "auto"`` and a :func:`launcher` environment: no arguments
      (JAX reads coordinator, count and id from it);
    * otherwise (or ``d.mode == "off"``): None, so a plain run never waits for a coordinator.
    """
    if d.mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed.mode={d.mode!r} not one of {DISTRIBUTED_MODES}")
    if d.coordinator:
        if d.mode == "off":
            raise ValueError(f"distributed.coordinator={d.coordinator!r} with distributed.mode='off'")
        return (dict(coordinator_address=d.coordinator, num_processes=d.num_processes,
                     process_id=d.process_id),
                f"jax.distributed: coordinator {d.coordinator} from the config, process "
                f"{d.process_id} of {d.num_processes}")
    found = launcher(environ, tpu_vm) if d.mode == "auto" else None
    if found:
        return {}, f"jax.distributed: coordinator, process count and id from the {found} environment"
    why = "distributed.mode='off'" if d.mode == "off" else "no coordinator and no launcher environment"
    return None, f"one process ({why})"


def planned_process_id(d, environ) -> int | None:
    """This process's id among several, known before ``jax.distributed`` starts (for file names
    such as the CLI's log): ``d.process_id`` with a coordinator and ``d.num_processes > 1``, the
    launcher's variable under SLURM / mpirun (mode "auto"); None for one process, or where only
    JAX learns it (a TPU pod's metadata: its hosts share no filesystem anyway)."""
    if d.coordinator:
        return d.process_id if d.num_processes > 1 else None
    found = launcher(environ) if d.mode == "auto" else None
    return next((int(environ[rank]) for name, _, _, rank in LAUNCHERS if name == found), None)


def init_distributed(d) -> None:
    """Starts ``jax.distributed`` as :func:`distributed_plan` says for this process's
    environment and prints its line; several processes on CPU use gloo collectives, with
    ``d.local_device_count`` devices each when given (the tests' two-process runs)."""
    import os

    from jax._src import cloud_tpu_init  # JAX's own "TPU chips and libtpu here" flag

    kwargs, line = distributed_plan(d, os.environ, cloud_tpu_init.running_in_cloud_tpu_vm)
    print(line)
    if kwargs is None:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if d.local_device_count:
        jax.config.update("jax_num_cpu_devices", d.local_device_count)
    jax.distributed.initialize(**kwargs)


def sync(what: str) -> None:
    """Barrier across processes (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(what)


def is_global(tree) -> bool:
    """Whether any leaf is a jax.Array spread over several processes (then every process must
    take part in reading it)."""
    return any(isinstance(x, jax.Array) and not x.is_fully_addressable
               for x in jax.tree_util.tree_leaves(tree))


def params_mesh(params):
    """The Mesh the params are placed on (a NamedSharding over more than one device), or None
    for params on one device."""
    for x in jax.tree_util.tree_leaves(params):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def process_local(path):
    """``path`` for one process; with several, a sibling ``<name>.process<i>`` each process
    fills itself (pod hosts share no filesystem, and on one that is shared no two processes
    write the same file)."""
    from pathlib import Path

    path = Path(path)
    return path if jax.process_count() == 1 else path.with_name(f"{path.name}.process{jax.process_index()}")


def allgather_objects(obj) -> list:
    """[the JSON-able ``obj`` of every process], in process order, through a collective (no
    files): each process's JSON bytes padded to the longest."""
    import json

    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = max_over_processes(raw.size)
    padded = np.zeros((1, n), np.uint8)
    padded[0, :raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded, tiled=True))
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


def to_host(tree):
    """numpy copies of (possibly multi-host, sharded) arrays, whole on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def max_over_processes(n: int) -> int:
    """The largest ``n`` any process holds (so every process runs as many global steps)."""
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray([n]))))


def replicate(params, strategy: str = "mesh"):
    """Params placed for :func:`data_parallel`: replicated over the mesh (mesh), or left as they
    are (pmap broadcasts them with ``in_axes=None``). Do it once, not per batch."""
    _check_strategy(strategy)
    return jax.device_put(params, NamedSharding(make_mesh(), P())) if strategy == "mesh" else params


def stack_for_pmap(tree):
    """One copy of every leaf per local device (the leading axis pmap maps over)."""
    n = jax.local_device_count()
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n,) + x.shape), tree)


def check_batch(batch: dict) -> None:
    """Every host-local batch array must split evenly over this host's devices."""
    n = jax.local_device_count()
    for k, x in batch.items():
        if x.shape[0] % n:
            raise ValueError(f"batch {k!r} axis {x.shape[0]} not a multiple of the {n} devices")


def split_for_pmap(batch: dict) -> dict:
    """[B, ...] -> [local devices, B / devices, ...] for every array of a batch."""
    check_batch(batch)
    n = jax.local_device_count()
    return {k: np.asarray(x).reshape((n, -1) + x.shape[1:]) for k, x in batch.items()}


def data_parallel(fn: Callable, strategy: str = "mesh", mesh: Mesh = None) -> Callable:
    """``fn(params, *batch) -> outputs`` (every batch array and output with a leading batch axis)
    -> the same function with the batch split over devices; ``params`` must come from
    :func:`replicate` with the same strategy, or be placed on ``mesh`` (sharded params, e.g.
    ``load_pretrained(..., mesh=mesh)``; the batch is then split over its data x fsdp axes).

    Each process passes its own rows (a multiple of :func:`batch_multiple`) and gets back the
    outputs of its rows; with several processes every one must call as often (see
    :func:`max_over_processes`).
    """
    _check_strategy(strategy)
    if strategy == "mesh":
        mesh = make_mesh() if mesh is None else mesh
        jitted = jax.jit(fn)

        def run_mesh(params, *batch):
            check_batch(dict(enumerate(batch)))
            arrays = list(global_batch(dict(enumerate(batch)), mesh).values())
            out = to_host(jitted(params, *arrays))
            mine = local_rows(arrays[0])  # this process's rows of the result
            return jax.tree_util.tree_map(lambda y: y[mine], out)

        return run_mesh

    mapped = {}  # number of batch arguments -> pmapped fn (params broadcast, batch split)

    def run_pmap(params, *batch):
        k = len(batch)
        if k not in mapped:
            mapped[k] = jax.pmap(fn, in_axes=(None,) + (0,) * k)
        out = mapped[k](params, *split_for_pmap(dict(enumerate(batch))).values())
        return jax.tree_util.tree_map(lambda y: y.reshape((-1,) + y.shape[2:]), out)

    return run_pmap


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel strategy {strategy!r} not one of {STRATEGIES}")
