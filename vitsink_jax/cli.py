"""What train.py and evaluate.py print when a run fails for a reason its user can act on, and
where their output goes.

Everything a run prints (stdout and stderr) also goes to ``workdir/log.txt`` (``log.<process>.txt``
for each process of a multi-process run), one time-stamped line per printed line: a terminal
bar's carriage-return refreshes are collapsed to the state each line ends in. In a ``gs://``
workdir the log is uploaded every few seconds and at the end (:func:`vitsink_jax.paths.append`).

The project's own errors (a bad checkpoint, benchmark, labels, predictions or instruction file,
a non-finite loss, a failed save) and OS errors (a missing file, a full disk, a permission)
end a run with one line on stderr, ``error: <what, where, what to do>``, and exit status 1;
``--verbose`` shows the traceback instead (and the library logs). Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
import traceback
from absl import flags, logging

from . import paths
from .checkpoints import CheckpointSaveError
from .convert.onnx_dinov2 import OnnxImportError
from .convert.safetensors_io import CheckpointError
from .data.benchmarks import BenchmarkError
from .data.instruct_build import InstructError
from .data.labels import LabelsError
from .mini_study import StudyError
from .scores import PredictionError

USER_ERRORS = (CheckpointError, CheckpointSaveError, OnnxImportError, BenchmarkError, InstructError,
               LabelsError, PredictionError, StudyError, FloatingPointError, OSError)


def describe(e: BaseException) -> str:
    """One line for a user error: its message, and for a full disk what to do."""
    if isinstance(e, OSError) and e.strerror:  # not "[Errno 28] ..."
        text = e.strerror + (f": {e.filename}" if e.filename else "")
    else:
        text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (free space there or point --workdir / the output path at another disk)"
    return text


class _LineLog:
    """A stream's text -> time-stamped whole lines in ``file`` (carriage returns collapsed)."""

    def __init__(self, file):
        self.file, self.pending = file, ""

    def write(self, text: str) -> None:
        *lines, self.pending = (self.pending + text).split("\n")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in lines:
            line = line.rsplit("\r", 1)[-1]
            if line.strip():
                self.file.write(f"{stamp} {line}\n")
        self.file.flush()

    def close(self) -> None:
        if self.pending.strip():
            self.write("\n")


class _Tee:
    """A stream that also feeds a :class:`_LineLog` (everything else is the stream's)."""

    def __init__(self, stream, log: _LineLog):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def log_to(path):
    """Copies stdout and stderr into ``path`` (appended) while the block runs, and what ends it
    early: a ``SystemExit`` message, another exception's traceback."""
    with paths.append(path, "a", encoding="utf-8") as f:
        logs = (_LineLog(f), _LineLog(f))
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(saved[0], logs[0]), _Tee(saved[1], logs[1])
        try:
            yield path
        except SystemExit as e:
            if isinstance(e.code, str):
                logs[1].write(e.code + "\n")
            raise
        except BaseException:
            logs[1].write(traceback.format_exc())
            raise
        finally:
            sys.stdout, sys.stderr = saved
            for log in logs:
                log.close()


def log_path(workdir):
    """``workdir/log.txt``, or ``log.<process>.txt`` in a run of several processes (from the
    config's ``distributed`` block or the launcher's environment, before jax.distributed
    starts: :func:`vitsink_jax.parallel.planned_process_id`; hosts need not share a
    filesystem, nor a file)."""
    from .parallel import planned_process_id

    dist = getattr(getattr(flags.FLAGS, "config", None), "distributed", None)
    process = None if dist is None else planned_process_id(dist, os.environ)
    return paths.path(workdir) / ("log.txt" if process is None else f"log.{process}.txt")


def define_verbose() -> None:
    flags.DEFINE_bool("verbose", False, "Show the traceback of an error and the library logs.")


def main_of(main):
    """``main`` for absl's ``app.run``: the libraries' absl logs are off (tfds / XLA info lines
    would drown the progress; orbax logs the traceback of an error the run raises anyway)
    unless ``--verbosity`` or ``--verbose`` is given, a user error (:data:`USER_ERRORS`)
    ends the run with one line (:func:`describe`), and the output goes to the workdir's log
    too (:func:`log_path`)."""
    def run(argv):
        # transformers' "PyTorch was not found" notice: the scripts use its tokenizers only
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        verbose = flags.FLAGS.verbose
        if not flags.FLAGS["verbosity"].present and not verbose:
            logging.set_verbosity(logging.FATAL)  # orbax logs a failed save's traceback
        workdir = getattr(flags.FLAGS, "workdir", None)  # (a main without the flag: no log)
        with log_to(log_path(workdir)) if workdir else contextlib.nullcontext():
            try:
                return main(argv)
            except USER_ERRORS as e:
                if verbose:
                    raise
                print(f"error: {describe(e)} (--verbose shows the traceback)", file=sys.stderr)
                sys.exit(1)
    return run
