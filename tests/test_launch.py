"""Launching as pod users launch: when jax.distributed starts (a configured coordinator, a
launcher's environment: Cloud TPU VM / pod, SLURM, mpirun; otherwise never, so a plain run does
not wait) and the device meshes (one slice: enumeration order on CPU, neighbouring chips on TPU;
several slices: the data axis across them, fsdp / tensor inside one). Fake environments and fake
device objects: no subprocess, no accelerator."""

import dataclasses
import importlib.util
import random
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from vitsink_jax import parallel

ROOT = Path(__file__).resolve().parents[1]
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:4321", "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}


def dist(**kw):
    """The configs' ``distributed`` block with ``kw`` changed."""
    return ml_collections.ConfigDict({**dict(mode="auto", coordinator="", num_processes=1,
                                             process_id=0, local_device_count=0), **kw})


def config(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_configs_carry_the_settings():
    evaluate, train = config("default"), config("diysink")
    assert evaluate.distributed.to_dict() == train.distributed.to_dict() == dist().to_dict()
    assert train.dcn_data == 1 and evaluate.eval.dcn_data == 1


def test_nothing_set_is_one_process():
    assert parallel.distributed_plan(dist(), {}) == (
        None, "one process (no coordinator and no launcher environment)")


def test_explicit_coordinator_wins_over_the_environment():
    d = dist(coordinator="10.0.0.1:1234", num_processes=2, process_id=1)
    for environ in ({}, SLURM):
        kwargs, line = parallel.distributed_plan(d, environ, tpu_vm=bool(environ))
        assert kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
        assert line == "jax.distributed: coordinator 10.0.0.1:1234 from the config, process 1 of 2"


@pytest.mark.parametrize("environ,name", [(SLURM, "SLURM"), (OMPI, "Open MPI (mpirun)"),
                                          ({**OMPI, **SLURM}, "Open MPI (mpirun)")])
def test_launcher_environment_starts_with_no_arguments(environ, name):
    """SLURM's and mpirun's variables (Open MPI first, as JAX tries it first) give
    initialize() with no arguments; a job of one task stays one plain process."""
    assert parallel.distributed_plan(dist(), environ) == (
        {}, f"jax.distributed: coordinator, process count and id from the {name} environment")
    one = {**environ, "SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"}
    assert parallel.distributed_plan(dist(), one)[0] is None


@pytest.mark.parametrize("environ,cluster", [(SLURM, "SlurmCluster"), (OMPI, "OmpiCluster")])
def test_launcher_variables_are_the_ones_jax_reads(monkeypatch, environ, cluster):
    """Our table agrees with JAX's own detection (so initialize() finds what we found)."""
    from jax._src import clusters

    for k in list(SLURM) + list(OMPI):
        monkeypatch.delenv(k, raising=False)
    assert not getattr(clusters, cluster).is_env_present()
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    assert getattr(clusters, cluster).is_env_present()


def test_tpu_vm_starts_with_no_arguments():
    """A Cloud TPU VM (one host or a pod; GKE names its hosts in TPU_WORKER_HOSTNAMES)."""
    assert parallel.distributed_plan(dist(), {}, tpu_vm=True) == (
        {}, "jax.distributed: coordinator, process count and id from the Cloud TPU VM environment")
    gke = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2"}
    assert parallel.launcher(gke, tpu_vm=True) == "Cloud TPU VM (GKE)"
    assert parallel.launcher(gke) is None  # the variables alone are no TPU VM
    assert parallel.launcher(SLURM, tpu_vm=True) == "SLURM"  # JAX tries SLURM first


def test_mode_off_and_bad_settings():
    assert parallel.distributed_plan(dist(mode="off"), SLURM, tpu_vm=True) == (
        None, "one process (distributed.mode='off')")
    with pytest.raises(ValueError, match=r"distributed.coordinator='h:1' with distributed.mode='off'"):
        parallel.distributed_plan(dist(mode="off", coordinator="h:1"), {})
    with pytest.raises(ValueError, match=r"distributed.mode='pod' not one of \('auto', 'off'\)"):
        parallel.distributed_plan(dist(mode="pod"), {})


def test_process_id_before_the_start_names_the_log():
    """The CLI's log.<process>.txt: the configured id, the launcher's, or one log.txt."""
    assert parallel.planned_process_id(dist(coordinator="h:1", num_processes=2, process_id=1), {}) == 1
    assert parallel.planned_process_id(dist(coordinator="h:1"), SLURM) is None  # one process
    assert parallel.planned_process_id(dist(), SLURM) == 3
    assert parallel.planned_process_id(dist(), OMPI) == 1
    assert parallel.planned_process_id(dist(mode="off"), SLURM) is None
    assert parallel.planned_process_id(dist(), {}) is None


def test_init_distributed_without_a_launcher_starts_nothing(monkeypatch, capsys):
    for k in list(SLURM) + list(OMPI):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail(f"started: {kw}"))
    parallel.init_distributed(dist())
    assert capsys.readouterr().out == "one process (no coordinator and no launcher environment)\n"


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh_utils reads of a device."""
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


@dataclasses.dataclass(frozen=True)
class FakeTpu(FakeDevice):
    slice_index: int = 0
    coords: tuple = (0, 0, 0)
    core_on_chip: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v4"


def tpu_pod(slices: int) -> list:
    """``slices`` slices of 4 x 2 chips, two hosts of 2 x 2 each, in a shuffled order."""
    out = [FakeTpu(id=8 * s + 4 * j + i, process_index=2 * s + i // 2, slice_index=s, coords=(i, j, 0))
           for s in range(slices) for j in range(2) for i in range(4)]
    random.Random(0).shuffle(out)
    return out


def attr(grid, name):
    return np.vectorize(lambda d: getattr(d, name))(grid)


@pytest.mark.parametrize("fsdp,tensor", [(1, 1), (2, 1), (1, 2), (2, 2), (8, 1), (1, 8), (2, 4)])
def test_one_slice_of_cpu_devices_keeps_todays_order(fsdp, tensor):
    devices = [FakeDevice(i, i // 4) for i in range(8)]
    grid = parallel.device_grid(fsdp, devices, tensor=tensor)
    want = np.asarray(devices, object).reshape(8 // (fsdp * tensor), fsdp, tensor)
    assert grid.shape == want.shape and (attr(grid, "id") == attr(want, "id")).all()


def test_make_mesh_on_this_process_devices():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert list(mesh.devices.ravel()) == jax.devices()


def neighbours(a, b) -> bool:
    return sum(abs(p - q) for p, q in zip(a.coords, b.coords)) == 1


def test_one_tpu_slice_puts_tensor_and_fsdp_on_neighbouring_chips():
    grid = parallel.device_grid(2, tpu_pod(1), tensor=2)
    assert grid.shape == (2, 2, 2)
    assert all(neighbours(*grid[i, j]) for i in range(2) for j in range(2))      # tensor
    assert all(neighbours(*grid[i, :, k]) for i in range(2) for k in range(2))   # fsdp


def test_several_slices_put_only_the_data_axis_across_them():
    grid = parallel.device_grid(2, tpu_pod(2), tensor=2, dcn_data=2)
    assert grid.shape == (4, 2, 2)  # data 2 per slice x 2 slices, fsdp 2, tensor 2
    slices = attr(grid, "slice_index")
    assert (slices == np.array([0, 0, 1, 1])[:, None, None]).all()  # one slice per data row
    assert sorted(attr(grid, "id").ravel()) == list(range(16))
    for s in range(2):  # each slice laid out as one slice alone is
        one = parallel.device_grid(2, [d for d in tpu_pod(2) if d.slice_index == s], tensor=2)
        assert (attr(grid[2 * s:2 * s + 2], "id") == attr(one, "id")).all()


def test_hosts_are_the_slices_of_devices_without_slice_index():
    """Several GPU hosts: the data axis across processes (each host's devices together)."""
    devices = [FakeDevice(i, i // 4, platform="gpu", device_kind="NVIDIA H100") for i in range(8)]
    grid = parallel.device_grid(2, devices, dcn_data=2)
    assert (attr(grid, "process_index") == np.array([0, 0, 1, 1])[:, None, None]).all()


@pytest.mark.parametrize("kw,devices,message", [
    (dict(dcn_data=3), tpu_pod(2),
     r"dcn_data=3 must equal the number of slices the devices come from \(2\)"),
    (dict(dcn_data=2), [FakeDevice(i, 0) for i in range(8)],
     r"dcn_data=2 must equal the number of processes the devices come from \(1\)"),
    (dict(fsdp=3, dcn_data=2), tpu_pod(2),
     r"fsdp=3 x tensor=1 does not divide the 8 devices of each of the dcn_data=2 slices"),
    (dict(fsdp=2, tensor=3), [FakeDevice(i, 0) for i in range(8)],
     r"fsdp=2 x tensor=3 does not divide the 8 devices$"),
    (dict(), tpu_pod(2), r"the devices come from 2 slices: set dcn_data=2"),
    (dict(tensor=0), tpu_pod(1), r"tensor=0 must be a positive integer"),
])
def test_bad_mesh_settings_name_the_setting(kw, devices, message):
    with pytest.raises(ValueError, match=message):
        parallel.device_grid(devices=devices, **kw)


class FakeSharded:
    """A batch array of ``rows`` rows whose addressable devices hold ``blocks`` (start, stop)."""

    def __init__(self, rows, blocks):
        self.shape = (rows, 3)
        index = {i: (slice(a, b), slice(None)) for i, (a, b) in enumerate(blocks)}
        self.sharding = type("S", (), {"addressable_devices_indices_map": lambda _, shape: index})()


def test_local_rows_follow_the_mesh():
    """This process's rows of a global batch: its devices' blocks in ascending order (a
    topology-aware mesh may interleave hosts), a block held twice (tensor replicas) once."""
    mine = parallel.local_rows(FakeSharded(16, [(12, 16), (4, 8), (4, 8)]))
    assert list(mine) == [4, 5, 6, 7, 12, 13, 14, 15]
    x = parallel.global_batch({"x": np.arange(2 * jax.device_count())}, parallel.make_mesh())["x"]
    assert list(parallel.local_rows(x)) == list(range(2 * jax.device_count()))
