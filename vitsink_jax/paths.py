"""The paths a user gives (``--workdir``, ``--config.checkpoint``, output and input files) on a
local disk or an object store (``gs://bucket/run``).

:func:`path` keeps a local path a ``pathlib.Path`` (local runs behave as before) and makes a URI
an ``etils.epath.Path``, which reaches ``gs://`` through TensorFlow's gfile where TensorFlow is
installed and else through fsspec's ``gcs`` filesystem (the ``gcsfs`` package: ``pip install
vitsink_jax[gcs]``, which also brings ``google-cloud-storage``, which orbax asks about a
bucket's layout).

An object store has no rename and no append. It does replace an object whole: a reader sees
the old object or the new one, never a part, and a failed upload leaves the old one. So:

* a file written whole from memory (JSON, JSONL, a plot) is uploaded straight to its name;
* a file written piece by piece (safetensors shards, a tokenizer's files) is written into a
  local temporary folder first and uploaded when complete (:func:`put`,
  :func:`vitsink_jax.atomic.replace_folder`): each file then appears whole, but a folder of
  several files is not replaced as one (a reader during the upload can see some new files
  beside old ones; the objects of the old folder that the new one lacks are deleted at the end);
* a log appended to while a run goes (log.txt, metrics.jsonl, TensorBoard events) is kept in a
  local file whose whole content replaces the object at the first flush :data:`UPLOAD_EVERY_S`
  seconds after the last upload and when it is closed (:func:`append`): a killed run loses
  what it logged since the last upload.

Models given as a URI are read from a local copy (:func:`local_copy`, in
``$VITSINK_CACHE/remote``). What a run with a URI workdir derives and reads back with local
file calls (the embedded default model, the instruction and benchmark data builds, whose
array_record files array_record opens itself, and assembled mini-study models) is kept in a
local folder of that cache instead (:func:`local_workdir`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

UPLOAD_EVERY_S = 30.0  # GCS takes about one update of an object per second


def is_remote(p) -> bool:
    """Whether ``p`` is a URI (``gs://...``) rather than a local path."""
    return "://" in os.fspath(p)


def path(p):
    """``p`` as a path: ``pathlib.Path`` when local, ``etils.epath.Path`` for a URI."""
    if is_remote(p):
        from etils import epath

        return epath.Path(os.fspath(p))
    return Path(p)


def cache_root() -> Path:
    """``$VITSINK_CACHE``, else ``~/.cache/vitsink_jax``: where imported and downloaded models
    are kept."""
    return Path(os.environ.get("VITSINK_CACHE") or Path.home() / ".cache" / "vitsink_jax")


def local_folder(uri) -> Path:
    """The local folder standing for the URI ``uri``: ``<cache_root>/remote/<scheme>/<rest>``."""
    scheme, _, rest = os.fspath(uri).partition("://")
    return cache_root() / "remote" / scheme / rest.strip("/")


def local_workdir(workdir) -> Path:
    """Where a run keeps what it derives and reads back with local file calls (the embedded
    default model, data builds, assembled mini-study models): ``workdir`` on a local disk, else
    :func:`local_folder` of it."""
    return local_folder(workdir) if is_remote(workdir) else Path(workdir)


def data_dir(configured: str, workdir, setting: str) -> Path:
    """The local folder of a data build: ``configured`` (the config's ``setting``), else
    ``workdir/tfds`` under :func:`local_workdir` (printed for a URI workdir). A URI
    ``configured`` is refused (SystemExit naming ``setting``): array_record files are read and
    written with local file calls; mount the bucket (gcsfuse) to keep them there."""
    if configured and is_remote(configured):
        raise SystemExit(f"error: --config.{setting}={configured}: data builds need a local folder "
                         "or a mounted bucket (array_record reads local files)")
    if configured:
        return Path(configured)
    local = local_workdir(workdir) / "tfds"
    if is_remote(workdir):
        print(f"data: --workdir {workdir} is an object store; the data build goes to {local} "
              f"(--config.{setting} chooses another local folder)")
    return local


def on_disk(p) -> Path:
    """A local folder holding the files of ``p``: ``p`` itself, or for a URI its
    :func:`local_copy`."""
    return local_copy(p) if is_remote(p) else Path(p)


def put(local: Path, dst) -> None:
    """Moves the complete local file ``local`` to ``dst``: a rename on a local disk, an upload
    (then the local file removed) to an object store."""
    if not is_remote(dst):
        os.replace(local, dst)
        return
    with open(local, "rb") as src, dst.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 24)
    os.unlink(local)


def local_copy(uri) -> Path:
    """The folder ``uri`` copied into :func:`local_folder` (with its subfolders); files whose
    size and modification time are those of the last copy (``.remote.json``) are not fetched
    again (a store that reports no time: always fetched)."""
    src, local = path(uri), local_folder(uri)
    if not src.is_dir():
        raise FileNotFoundError(f"{uri}: no such folder")
    record = local / ".remote.json"
    had = json.loads(record.read_text()) if record.is_file() else {}
    now = {}
    for rel, f in files_in(src).items():
        stat = f.stat()
        now[rel] = [stat.length, stat.mtime]
        if had.get(rel) != now[rel] or not stat.mtime or not (local / rel).is_file():
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{f.name}.", dir=(local / rel).parent)
            with os.fdopen(fd, "wb") as out, f.open("rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 24)
            os.replace(tmp, local / rel)
    record.write_text(json.dumps(now))
    return local


def files_in(folder) -> dict:
    """{path relative to ``folder``: file} of every file under ``folder`` (local or a URI), in its
    subfolders too, in sorted order; {} when ``folder`` is not a folder."""
    folder = path(folder)
    if not folder.is_dir():
        return {}
    return {os.path.relpath(os.fspath(f), os.fspath(folder)): f for f in _walk(folder)}


def _walk(folder):
    """The files under the folder ``folder``, sorted (epath's walk() yields a gcsfs folder
    without its ``gs://``)."""
    for f in sorted(folder.iterdir()):
        yield from _walk(f) if f.is_dir() else [f]


class _Mirrored:
    """A local file standing for the object ``remote`` (seeded with its bytes): its whole
    content replaces the object at close() and at a flush() :data:`UPLOAD_EVERY_S` after the
    last upload."""

    def __init__(self, remote, mode: str, **kwargs):
        fd, self.local = tempfile.mkstemp(prefix=f"{remote.name}.")
        with os.fdopen(fd, "wb") as f:
            if remote.exists():
                f.write(remote.read_bytes())
        self.remote, self.file, self.uploaded = remote, open(self.local, mode, **kwargs), time.monotonic()

    def write(self, data):
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()
        if time.monotonic() - self.uploaded >= UPLOAD_EVERY_S:
            self._upload()

    def _upload(self) -> None:
        self.remote.write_bytes(Path(self.local).read_bytes())
        self.uploaded = time.monotonic()

    def close(self) -> None:
        if self.file.closed:
            return
        self.file.close()
        try:
            self._upload()
        finally:
            os.unlink(self.local)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append(p, mode: str = "a", **kwargs):
    """``open(p, mode)`` for appending (``"a"`` / ``"ab"``), its folder created; for an object
    store a local file mirrored to it (see the module docstring)."""
    p = path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    return _Mirrored(p, mode, **kwargs) if is_remote(p) else open(p, mode, **kwargs)
