"""What train.py and evaluate.py print when a run fails for a reason its user can act on.

The project's own errors (a bad checkpoint, benchmark, labels, predictions or instruction file,
a non-finite loss, a failed save) and OS errors (a missing file, a full disk, a permission)
end a run with one line on stderr, ``error: <what, where, what to do>``, and exit status 1;
``--verbose`` shows the traceback instead (and the library logs). Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys

from absl import flags, logging

from .checkpoints import CheckpointSaveError
from .convert.onnx_dinov2 import OnnxImportError
from .convert.safetensors_io import CheckpointError
from .data.benchmarks import BenchmarkError
from .data.instruct import InstructError
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


def define_verbose() -> None:
    flags.DEFINE_bool("verbose", False, "Show the traceback of an error and the library logs.")


def main_of(main):
    """``main`` for absl's ``app.run``: the libraries' absl logs are off (tfds / XLA info lines
    would drown the progress; orbax logs the traceback of an error the run raises anyway)
    unless ``--verbosity`` or ``--verbose`` is given, and a user error (:data:`USER_ERRORS`)
    ends the run with one line (:func:`describe`)."""
    def run(argv):
        verbose = flags.FLAGS.verbose
        if not flags.FLAGS["verbosity"].present and not verbose:
            logging.set_verbosity(logging.FATAL)  # orbax logs a failed save's traceback
        try:
            return main(argv)
        except USER_ERRORS as e:
            if verbose:
                raise
            print(f"error: {describe(e)} (--verbose shows the traceback)", file=sys.stderr)
            sys.exit(1)
    return run
