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
and keeps its traceback. A setting the run cannot start with (the command line, the config's
values, the environment: :mod:`vitsink_jax.options`) is one such line too, with exit status 2,
before anything is loaded or written.

A run holds its workdir's lock (:mod:`vitsink_jax.run_lock`) from before it writes anything
there (its log included) to its end: a second run in that workdir is refused by name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
import traceback
from pathlib import Path
from absl import app, flags, logging

from . import options, paths, run_lock
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


def _fail(e: BaseException, verbose: bool, status: int):
    """Ends the run for the user error being handled: one line and ``status``, or with
    ``verbose`` its traceback (re-raised)."""
    if verbose:
        raise
    print(f"error: {describe(e)} (--verbose shows the traceback)", file=sys.stderr)
    sys.exit(status)


@contextlib.contextmanager
def one_line_errors(verbose: bool):
    """A :class:`~vitsink_jax.options.ConfigError` in the block ends the run with one line and
    exit status 2, another user error (:data:`USER_ERRORS`) with one line and status 1."""
    try:
        yield
    except options.ConfigError as e:
        _fail(e, verbose, 2)
    except USER_ERRORS as e:
        _fail(e, verbose, 1)


def main_of(main, check=None):
    """``main`` for absl's ``app.run``: the libraries' absl logs are off (tfds / XLA info lines
    would drown the progress; orbax logs the traceback of an error the run raises anyway)
    unless ``--verbosity`` or ``--verbose`` is given; ``check(config)`` first (it raises
    :class:`~vitsink_jax.options.ConfigError`); then the workdir's lock is taken
    (:func:`vitsink_jax.run_lock.workdir_lock`) and the output goes to the workdir's log too
    (:func:`log_path`); a user error ends the run with one line (:func:`one_line_errors`)."""
    def run(argv):
        # transformers' "PyTorch was not found" notice: the scripts use its tokenizers only
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        verbose = flags.FLAGS.verbose
        if not flags.FLAGS["verbosity"].present and not verbose:
            logging.set_verbosity(logging.FATAL)  # orbax logs a failed save's traceback
        workdir = getattr(flags.FLAGS, "workdir", None)  # (a main without the flag: no log, no lock)
        config = getattr(flags.FLAGS, "config", None)
        with one_line_errors(verbose):  # a bad setting, a held lock, a workdir we cannot write
            if check is not None:
                check(config)
            dist = getattr(config, "distributed", None)
            with (run_lock.workdir_lock(workdir, dist) if workdir else contextlib.nullcontext()) as notice, \
                    log_to(log_path(workdir)) if workdir else contextlib.nullcontext():
                with one_line_errors(verbose):  # the run's own errors, in the log too
                    if notice:
                        print(notice, file=sys.stderr)
                    return main(argv)
    return run


def print_config_help(spec: str) -> None:
    """Prints every key of the config file ``spec`` ("file.py[:argument]") with its default and
    the note the file's comments give it (:mod:`vitsink_jax.config_help`)."""
    from .config_help import config_help

    file = spec.split(":", 1)[0]
    print(config_help(options.load_config_file(spec), Path(file).read_text(), file))


def run_script(main, define_flags, default_config: str, check) -> None:
    """Runs a script's ``main`` as train.py and evaluate.py run: the environment and the command
    line checked against the config file before absl parses them
    (:func:`vitsink_jax.options.check_command_line`, so a misspelt ``--config.<key>`` or a
    missing config file is one ``error:`` line, exit status 2, not a traceback), a flag absl
    cannot parse (``--config.steps=abc``, an unknown flag) or a stray positional argument the
    same, then ``main`` through :func:`main_of` with ``check`` (the config's values).
    ``--config.help`` prints the config's keys (:func:`print_config_help`) and exits."""
    verbose = any(arg.lstrip("-").lower() in ("verbose", "verbose=true", "verbose=1") for arg in sys.argv[1:])
    with one_line_errors(verbose):
        options.check_environment()
        if "--config.help" in sys.argv[1:]:
            print_config_help(options.config_argument(sys.argv, default_config))
            sys.exit(0)
        options.check_command_line(sys.argv, default_config)
        define_flags()

    def parse_flags(argv):
        with one_line_errors(verbose):
            try:
                rest = flags.FLAGS(argv)
            except flags.Error as e:
                raise options.ConfigError(str(e)) from e
            if rest[1:]:  # `python evaluate.py benchmark` would run the default mode
                raise options.ConfigError(
                    f"unexpected argument(s) {' '.join(rest[1:])!r}: every setting is a flag, e.g. "
                    "--config.mode=benchmark (--config.help lists the keys)")
            return rest

    app.run(main_of(main, check), flags_parser=parse_flags)
