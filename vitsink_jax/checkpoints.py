"""Train-state checkpoints (atomic, keep the newest N, resume) in two storages.

* ``global``: an orbax CheckpointManager checkpoint of global arrays that every process writes
  its shards into; needs a directory all hosts share (gs:// on pods, or one machine), and
  restores onto any mesh.
* ``per_process``: each process keeps the shards its own devices hold in a folder of its own
  (``<dir>.process<i>`` with several processes; a step folder per checkpoint, written aside and
  renamed into place), so hosts need no shared filesystem (orbax's managers assume one primary
  host writing shared metadata, so this storage is not built on them); a resume
  needs the same mesh and process count (checked against the saved shard layout). Shards that
  several local devices hold identically (replicated params, the step, the RNG) are kept once.

``auto`` is ``per_process`` with several processes and ``global`` with one or an object-store
directory (``gs://``, which every host sees; ``per_process`` writes local files and refuses one).
On an object store orbax marks a finished step with a commit file instead of renaming it in.

A failed save (disk full, quota, permissions) removes its temporary folder at once and raises
:class:`CheckpointSaveError` naming the folder; the checkpoints saved before stay usable. A
checkpoint whose state proved unusable (its loss is not finite) is set aside
(:meth:`StateCheckpoints.set_aside`: ``<step>`` renamed ``<step>.nonfinite``, kept for
inspection), so a resume takes the newest one before it.

Every checkpoint records the size and sha256 of its files (:mod:`vitsink_jax.checksums`: a
``checksums.json`` in the step folder, written before the per-process folder is renamed in, and
by process 0 once every process's orbax save has finished). :meth:`StateCheckpoints.latest_step`
checks the newest step before it is used: a damaged one (a file missing, truncated or changed,
no manifest) is set aside as ``<step>.damaged-<time>``, named in one line, and the step before
it is taken; with every step damaged the run ends with one ``error:`` line. The steps a folder
held when it was first opened by a version that records checksums (:data:`UNCHECKED`) resume
unchecked.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from . import checksums, parallel, paths
from .atomic import share

STORAGES = ("auto", "global", "per_process")
# in a checkpoint folder: {"steps": [...]}, the steps it held when a version recording checksums
# first opened it (written without a manifest, so resumed unchecked)
UNCHECKED = ".unchecked_steps.json"


class CheckpointSaveError(OSError):
    """A train-state checkpoint could not be written (``errno`` as the cause's: ENOSPC for a full
    disk); the message names the checkpoint folder."""


def _save_error(directory: Path, step: int, e: BaseException) -> CheckpointSaveError:
    """The error of a failed save of ``step`` into ``directory``: the cause's errno (orbax and
    tensorstore report a full disk as a ValueError with ``os_error_code='28'``) and one line."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code is None and ("No space left on device" in text or "os_error_code='28'" in text):
        code = errno.ENOSPC
    what = (f"{os.strerror(code)}: {e.strerror}" if code and getattr(e, "strerror", None) not in
            (None, os.strerror(code)) else os.strerror(code) if code else
            f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}")
    return CheckpointSaveError(code or errno.EIO, f"saving checkpoint step {step} in {directory} "
                               f"failed ({what}); the checkpoints saved before are intact")


def _index_key(index: tuple, shape: tuple) -> tuple:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _local_layout(x) -> tuple:
    """(this process's devices in id order, the index key each holds, the distinct keys)."""
    idx = x.sharding.addressable_devices_indices_map(x.shape)
    devices = sorted(idx, key=lambda d: d.id)
    keys = [_index_key(idx[d], x.shape) for d in devices]
    return devices, keys, list(dict.fromkeys(keys))


def local_shards(state):
    """Every leaf -> [distinct local shards, ...shard shape] numpy (this process's part)."""
    def one(x):
        devices, keys, unique = _local_layout(x)
        by_device = {s.device: s for s in x.addressable_shards}
        first = {k: d for d, k in zip(reversed(devices), reversed(keys))}
        return np.stack([np.asarray(by_device[first[k]].data) for k in unique])
    return jax.tree_util.tree_map(one, state)


def from_local_shards(local, like):
    """The inverse of :func:`local_shards` onto the shardings of ``like`` (global arrays)."""
    def one(path, data, x):
        devices, keys, unique = _local_layout(x)
        if data.shape[0] != len(unique) or data.shape[1:] != x.sharding.shard_shape(x.shape):
            raise SystemExit(f"error: checkpointed state {jax.tree_util.keystr(path)} was saved on "
                             f"another mesh ({data.shape[0]} x {list(data.shape[1:])} shards here, "
                             f"{len(unique)} x {list(x.sharding.shard_shape(x.shape))} now); resume "
                             "with the same fsdp / tensor / process count, or use "
                             "checkpoint_storage=global on a shared filesystem")
        arrays = [jax.device_put(data[unique.index(k)], d) for d, k in zip(devices, keys)]
        return jax.make_array_from_single_device_arrays(x.shape, x.sharding, arrays)
    return jax.tree_util.tree_map_with_path(one, local, like)


class _ProcessFolder:
    """This process's checkpoints: ``<step>/state.npz`` (every leaf's local shards, stored as raw
    unsigned ints beside their dtype names) + ``meta.json``, each step written into a temporary
    folder and renamed into place; the newest ``keep`` steps stay."""

    def __init__(self, directory: Path, keep: int):
        self.directory, self.keep = directory, keep
        directory.mkdir(parents=True, exist_ok=True)

    def steps(self) -> list:
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())

    def save(self, step: int, tree, meta: dict) -> None:
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
        tmp = Path(tempfile.mkdtemp(prefix=f".{step}.tmp-", dir=self.directory))
        try:
            with open(tmp / "state.npz", "wb") as f:
                np.savez(f, **{f"leaf{i}": v.view(f"u{v.dtype.itemsize}") for i, v in enumerate(flat.values())})
                f.flush()
                os.fsync(f.fileno())
            index = [{"key": k, "dtype": str(v.dtype), "shape": list(v.shape)} for k, v in flat.items()]
            (tmp / "meta.json").write_text(json.dumps({"meta": meta, "leaves": index}))
            checksums.write(tmp)
            final = self.directory / str(step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(share(tmp), final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(self.directory / str(old))

    def meta(self, step: int) -> dict:
        return json.loads((self.directory / str(step) / "meta.json").read_text())["meta"]

    def restore(self, step: int, like):
        folder = self.directory / str(step)
        index = json.loads((folder / "meta.json").read_text())["leaves"]
        leaves = jax.tree_util.tree_leaves_with_path(like)
        keys = [jax.tree_util.keystr(k) for k, _ in leaves]
        if keys != [e["key"] for e in index]:
            raise SystemExit(f"error: {folder} holds another train state ({len(index)} leaves, "
                             f"this run has {len(keys)}; first difference at "
                             f"{next((a for a, b in zip(keys, [e['key'] for e in index]) if a != b), '-')})")
        with np.load(folder / "state.npz") as data:
            values = [data[f"leaf{i}"].view(jnp.dtype(e["dtype"])) for i, e in enumerate(index)]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), values)


class StateCheckpoints:
    """The train state's checkpoints under ``directory`` (see the module docstring)."""

    def __init__(self, directory, keep: int, storage: str = "auto"):
        if storage not in STORAGES:
            raise ValueError(f"checkpoint storage {storage!r} not one of {STORAGES}")
        remote = paths.is_remote(directory)
        if storage == "auto":
            storage = "per_process" if jax.process_count() > 1 and not remote else "global"
        if storage == "per_process" and remote:
            raise ValueError(f"checkpoint storage per_process writes local files, not {directory}; "
                             "use checkpoint_storage=global (or auto) with an object store")
        self.storage = storage
        directory = paths.path(directory) if remote else Path(directory).absolute()
        if storage == "per_process":
            self.directory = parallel.process_local(directory)
            self.folder = _ProcessFolder(self.directory, keep)
        else:
            self.directory = directory
            self.manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True))
        self.checked = set(self._unchecked_steps())  # steps known intact (or never checkable)

    def _checks(self) -> bool:
        """Whether this process checks the checksums (per process: every one, its own folder;
        global: process 0, for all)."""
        return self.storage == "per_process" or jax.process_index() == 0

    def _unchecked_steps(self) -> list:
        """The steps saved without checksums (:data:`UNCHECKED`; written the first time)."""
        if not self._checks():
            return []
        record = self.directory / UNCHECKED
        if not record.exists():  # written aside and renamed in: never a half-written record
            tmp = self.directory / f"{UNCHECKED}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps({"steps": self.steps()}))
            tmp.rename(record)
        return json.loads(record.read_text())["steps"]

    def latest_step(self):
        """The newest intact step to resume from (see the module docstring: a damaged newer one
        is set aside); per process, the newest one every process holds intact (a host that died
        before renaming its last step in leaves the others one step ahead)."""
        damaged = []
        while (step := self._newest_step()) is not None:
            problem = self._damage(step)
            if problem is None:
                return step
            aside = self.set_aside(step, time.strftime("damaged-%Y%m%dT%H%M%S"))
            damaged.append(aside.name)
            if jax.process_index() == 0:
                print(f"checkpoint step {step} in {self.directory} is damaged: {problem}; "
                      f"set aside as {aside.name}")
        if damaged:
            raise SystemExit(f"error: no intact checkpoint in {self.directory} (set aside: "
                             f"{', '.join(damaged)}); run again to start from step 0, or put "
                             "back an intact copy of a checkpoint")
        return None

    def _damage(self, step: int):
        """None when checkpoint ``step`` is intact on every process, else what is wrong."""
        mine = (checksums.damage(self.directory / str(step))
                if self._checks() and step not in self.checked else None)
        problems = [(i, p) for i, p in enumerate(parallel.allgather_objects(mine)) if p]
        if not problems:
            self.checked.add(step)
            return None
        i, problem = problems[0]
        return f"process {i}: {problem}" if self.storage == "per_process" and jax.process_count() > 1 else problem

    def _newest_step(self):
        """The newest step held (by every process, per process)."""
        if self.storage != "per_process":
            return self.manager.latest_step()
        held = parallel.allgather_objects(self.folder.steps())
        common = sorted(set.intersection(*map(set, held)))
        if any(held) and not common:
            raise SystemExit(f"error: the processes' checkpoints share no step ({held}); "
                             f"remove {self.directory.name} folders of an older run")
        return common[-1] if common else None

    def save(self, step: int, state, meta: dict) -> None:
        """Writes ``state`` and ``meta`` as ``step``, then the checksums of its files; on failure
        removes the partial step and raises :class:`CheckpointSaveError` on every process (a
        failure on one host, e.g. its disk full, would otherwise leave the others waiting in the
        next collective). A step whose checksums could not be written is set aside at resume."""
        local = local_shards(state) if self.storage == "per_process" else None

        def write():
            if not paths.is_remote(self.directory):  # an object store has no disk to fill
                self._check_space(state if local is None else local)
            if local is not None:
                self.folder.save(step, local, meta)  # its checksums included
            else:
                self.manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
                self.manager.wait_until_finished()

        self._on_every_process(step, write)
        if self.storage != "per_process":  # every process's shards are in (the collective above)
            self._on_every_process(step, lambda: jax.process_index() == 0 and checksums.write(
                self.directory / str(step)))
        self.checked.add(step)

    def _on_every_process(self, step: int, write) -> None:
        """Runs ``write()`` (a part of saving ``step``), then raises :class:`CheckpointSaveError`
        on every process if it failed on any, after removing orbax's temporary folder."""
        try:
            write()
            error = None
        except (OSError, ValueError) as e:  # tensorstore reports IO errors as ValueError
            if (self.storage != "per_process" and jax.process_index() == 0
                    and not paths.is_remote(self.directory)):
                for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            error = _save_error(self.directory, step, e)
            error.__cause__ = e
        failed = [(i, x) for i, x in enumerate(parallel.allgather_objects(
            None if error is None else [error.errno, str(error)])) if x]
        if error is not None:
            raise error
        if failed:  # another process's save failed: this one's step is incomplete as a whole
            i, (code, text) = failed[0]
            raise CheckpointSaveError(code, f"process {i}: {text}")

    def _check_space(self, tree) -> None:
        """Raises ENOSPC before writing when the disk has less room than ``tree``'s bytes (the
        distinct local shards for per-process storage, or the global arrays for the shared
        storage): a write that fails midway leaves orbax's writer threads printing tracebacks."""
        need = sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise OSError(errno.ENOSPC, f"{need / 2**20:.1f} MiB to write, {free / 2**20:.1f} MiB free")

    def set_aside(self, step: int, why: str = "nonfinite"):
        """Renames checkpoint ``step`` to ``<step>.<why>`` (``.<why>-2``, ... if taken): kept for
        inspection, no longer resumed from. Returns the new path (process 0's ``why``)."""
        why = parallel.allgather_objects(why)[0]  # one name on every process
        def name(n: int):
            return self.directory / (f"{step}.{why}" + (f"-{n}" if n > 1 else ""))
        n = 1
        while name(n).exists():
            n += 1
        new = name(max(parallel.allgather_objects(n)))
        if self.storage == "per_process" or jax.process_index() == 0:
            (self.directory / str(step)).rename(new)  # an object store copies and deletes
        if self.storage != "per_process":
            parallel.allgather_objects(None)  # every process sees the rename before reloading
            self.manager.reload()
        return new

    def steps(self) -> list:
        """The steps held, oldest first."""
        return self.folder.steps() if self.storage == "per_process" else list(self.manager.all_steps())

    def meta(self, step: int) -> dict:
        if self.storage == "per_process":
            return self.folder.meta(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, like):
        """The state of ``step`` in the structure and placement of ``like``."""
        if self.storage == "per_process":
            return from_local_shards(self.folder.restore(step, local_shards(like)), like)
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                            jax.tree_util.tree_leaves(got.state))
