"""A run's results written aside and moved in at its end (evaluate.py's modes).

Inside :func:`session` a mode writes each result (results.json, predictions_*.jsonl, plots,
reports: :func:`write_json`, :func:`write_jsonl`, :mod:`vitsink_jax.plots`) to :func:`staged` of
the path it names under the workdir: the same relative path in the session's staging folder (``workdir/.outputs.tmp``, per process with several processes; for a
``gs://`` workdir a local folder). When the mode returns, every staged file is moved to its
path (a rename on a local disk, an upload to an object store), replacing the previous run's
file of that name. An interruption (Ctrl-C) or an error removes the staging folder instead: the
workdir keeps the previous run's results, none of the new run's beside them. What a run derives
and reads back (data builds, the embedded model, assembled mini-study models, log.txt) is not a
result and is written where it lives, outside the session. Results of an earlier run that this
run does not write (another variant's predictions) stay.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from . import paths, provenance

_open: dict = {}  # the workdir of an open session (as given, with a trailing "/") -> staging folder


@contextlib.contextmanager
def session(workdir):
    """Stages the results :func:`staged` names under ``workdir`` while the block runs and moves
    them into ``workdir`` when it ends normally; on any exception (KeyboardInterrupt too) they
    are dropped and the exception goes on. Yields the staging folder."""
    from .parallel import process_local

    folder = process_local(paths.local_workdir(workdir) / ".outputs.tmp")
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted run's
    folder.mkdir(parents=True)
    key = _key(workdir)
    _open[key] = folder
    try:
        yield folder
        _open.pop(key)
        _move_in(folder, paths.path(workdir))
    finally:
        _open.pop(key, None)
        shutil.rmtree(folder, ignore_errors=True)


def staged(path):
    """Where a result meant for ``path`` is written now: its place in the staging folder of the
    open session whose workdir holds ``path``, else ``path`` itself (a mode called outside a
    session, as the tests call them, writes straight to its results)."""
    text = os.fspath(path)
    for key, folder in _open.items():
        if text.startswith(key):
            return folder / text[len(key):]
    return path


def write_json(path, obj):
    """:func:`vitsink_jax.provenance.write_json` of a result meant for ``path`` (staged in a
    session); returns ``path``."""
    provenance.write_json(staged(path), obj)
    return path


def write_jsonl(path, rows):
    """:func:`vitsink_jax.provenance.write_jsonl` of a result meant for ``path`` (staged in a
    session); returns ``path``."""
    provenance.write_jsonl(staged(path), rows)
    return path


def _key(workdir) -> str:
    return os.fspath(workdir).rstrip("/") + "/"


def _move_in(folder, workdir) -> None:
    """Moves every file under the local ``folder`` to the same relative path in ``workdir``."""
    for rel, f in paths.files_in(folder).items():
        target = workdir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        paths.put(f, target)
