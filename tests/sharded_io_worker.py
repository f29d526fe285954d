"""Run by tests/test_sharded_io.py in a fresh process (devices are fixed at jax import).

    python sharded_io_worker.py CHECKPOINT OUT one               # 8 fake devices, one process
    python sharded_io_worker.py CHECKPOINT OUT multi PORT PID    # process PID of 2, 4 devices each

Loads CHECKPOINT sharded over every device (fsdp=8, and fsdp=2 x tensor=2 loop / scanned in the
one-process run), checks each device's shards against a plain one-device load, bitwise, and the
bytes each device holds; then saves the fsdp=8 params (small shards) to OUT/saved (process 0
writes). Prints one line ``RESULT {json}``.
"""

import json
import sys
from pathlib import Path

ckpt, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if mode == "multi":
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[4]}", num_processes=2, process_id=int(sys.argv[5]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

import vitsink_jax as vj  # noqa: E402
from vitsink_jax import parallel  # noqa: E402


def reference(scan: bool) -> dict:
    """The one-device load (float32), as flat numpy."""
    _, p = vj.load_pretrained(ckpt, dtype=jnp.float32, scan_layers=scan)
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(p).items()}


def check(params: dict, ref: dict) -> dict:
    """Every addressable shard equals the reference slice bitwise; returns bytes per device."""
    per_device = {}
    for path, x in traverse_util.flatten_dict(params).items():
        assert x.dtype == jnp.float32, (path, x.dtype)
        assert x.shape == ref[path].shape, (path, x.shape, ref[path].shape)
        for s in x.addressable_shards:
            got = np.asarray(s.data)
            np.testing.assert_array_equal(got, ref[path][s.index], err_msg="/".join(path))
            per_device[str(s.device.id)] = per_device.get(str(s.device.id), 0) + got.nbytes
    return per_device


result = {"devices": jax.device_count(), "local": jax.local_device_count()}
layouts = [(8, 1, False)] if mode == "multi" else [(8, 1, False), (2, 2, False), (2, 2, True)]
for fsdp, tensor, scan in layouts:
    mesh = parallel.make_mesh(fsdp, tensor=tensor)
    model, params = vj.load_pretrained(ckpt, dtype=jnp.float32, mesh=mesh, scan_layers=scan)
    name = f"fsdp{fsdp}_tensor{tensor}_{'scan' if scan else 'loop'}"
    result[name] = check(params, reference(scan))
    if (fsdp, tensor, scan) == (8, 1, False):
        vj.save_pretrained(model, params, out / "saved", max_shard_size="60KB")
    if scan:
        vj.save_pretrained(model, params, out / "saved_scan", max_shard_size="60KB")
result["total_bytes"] = int(sum(v.nbytes for v in reference(False).values()))
if mode == "one":  # bad placements: a large param fsdp cannot split is named in a warning; an
    import warnings  # explicit sharding that does not divide a param is refused naming it

    from jax.sharding import NamedSharding, PartitionSpec as P

    from vitsink_jax.convert.load_plan import Planned
    from vitsink_jax.convert.reading import load_params, plan_shardings

    mesh = parallel.make_mesh(8)
    plan = {("odd", "kernel"): Planned((3 * 7 * 1001, 5), [], False, None),
            ("fine", "kernel"): Planned((64, 512), [], False, None)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_shardings(plan, mesh)
    result["warnings"] = [str(w.message) for w in caught]
    try:
        split_first = {k: NamedSharding(mesh, P("fsdp", *[None] * (v.ndim - 1)))
                       for k, v in reference(False).items()}
        load_params(ckpt, model.config, model.clone(scan_layers=False),
                    shardings=traverse_util.unflatten_dict(split_first))
    except vj.CheckpointError as e:
        result["refused"] = str(e)
print("RESULT", json.dumps(result))
