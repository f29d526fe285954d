"""A manifest of a checkpoint folder's files (size and sha256 of each), written when the
checkpoint is complete and checked before it is used (:mod:`vitsink_jax.checkpoints`): orbax
writes no checksum of its array data (zarr3 checksums only a shard's index, and the default
ocdbt files carry none), so a flipped byte would otherwise restore as a wrong weight.

Files are hashed in 1 MiB reads (no file is held in memory whole); the manifest
(:data:`MANIFEST`, in the folder itself) is written by
:func:`vitsink_jax.atomic.write_text_atomic` (a temporary file, flushed, renamed into place; an
object store writes an object whole). Works on local folders and ``gs://`` ones.
"""

from __future__ import annotations

import json

from . import paths
from .atomic import file_size, write_text_atomic
from .scores import file_sha256

MANIFEST = "checksums.json"


def _files(folder) -> dict:
    """{path relative to ``folder``: file} of every file under ``folder`` but the manifest."""
    return {rel: f for rel, f in paths.files_in(folder).items() if rel != MANIFEST}


def write(folder) -> None:
    """Records the size and sha256 of every file under ``folder`` in ``folder/MANIFEST``."""
    folder = paths.path(folder)
    files = {rel: [file_size(f), file_sha256(f)] for rel, f in _files(folder).items()}
    write_text_atomic(folder / MANIFEST, json.dumps({"files": files}, sort_keys=True))


def damage(folder) -> str | None:
    """None when every file of ``folder``'s manifest is there with its size and sha256; else
    what is wrong, naming the first damaged file (missing, another size, other bytes) or the
    manifest (missing, unreadable). Files the manifest does not list are not looked at."""
    folder = paths.path(folder)
    try:
        recorded = {rel: (int(size), str(sha256)) for rel, (size, sha256)
                    in json.loads((folder / MANIFEST).read_text())["files"].items()}
    except FileNotFoundError:
        return f"no {MANIFEST}: the checkpoint was not completed"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__}: {e})"
    for rel, (size, sha256) in sorted(recorded.items()):
        f = folder / rel
        if not f.is_file():
            return f"{rel} missing"
        if (have := file_size(f)) != size:
            return f"{rel} is {have} bytes, {size} when written"
        if file_sha256(f) != sha256:
            return f"{rel} has other bytes than when written (sha256 differs)"
    return None
