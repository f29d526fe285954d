"""The command-line tools' errors a person can read: one line naming what, where and what to
do, exit status 1, the traceback only with --verbose; a bug keeps its traceback. (The faults
themselves are tested where they live: test_train.py for non-finite losses, changed resumes and
full disks, test_data_faults.py for bad rows, test_file_faults.py for exports.)"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags, logging

from vitsink_jax import cli
from vitsink_jax.data.benchmarks import BenchmarkError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli_flags():
    if "verbose" not in flags.FLAGS:
        cli.define_verbose()
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["test"])
    level = logging.get_verbosity()
    yield flags.FLAGS
    flags.FLAGS.verbose = False
    logging.set_verbosity(level)


def raising(error):
    def main(argv):
        raise error
    return main


def test_user_errors_end_in_one_line_and_bugs_keep_their_traceback(cli_flags, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main_of(raising(BenchmarkError("b.tsv: missing column 'answer' (has ['index'])")))([])
    assert e.value.code == 1
    assert capsys.readouterr().err == ("error: b.tsv: missing column 'answer' (has ['index']) "
                                       "(--verbose shows the traceback)\n")
    with pytest.raises(SystemExit):
        cli.main_of(raising(OSError(errno.ENOSPC, "No space left on device", "/runs/x")))([])
    assert capsys.readouterr().err.startswith("error: No space left on device: /runs/x (free space "
                                              "there or point --workdir")
    with pytest.raises(KeyError):  # not a user error: a bug, with its traceback
        cli.main_of(raising(KeyError("params")))([])
    cli_flags.verbose = True
    with pytest.raises(BenchmarkError):
        cli.main_of(raising(BenchmarkError("b.tsv: no rows")))([])


@pytest.mark.slow
def test_evaluate_on_a_bad_benchmark_file_prints_one_line(tmp_path):
    """The whole CLI (one process start, ~12 s): a benchmark file without an answer column."""
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tquestion\timage\n1\twhat?\tabc\n")
    proc = subprocess.run([sys.executable, "evaluate.py", f"--workdir={tmp_path / 'w'}",
                           "--config.mode=benchmark", "--config.checkpoint=embedded", f"--config.benchmark.file={bad}",
                           "--config.benchmark.name=mmstar"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {bad}: missing column 'answer' (has ['image', 'index', 'question']) "
        "(--verbose shows the traceback)")


def test_offline_runs_are_quiet(cli_flags, tmp_path, capsys, monkeypatch):
    """No tfds "Downloading and preparing" banner when a benchmark is written to records, and
    the scripts turn transformers' advisory notices ("PyTorch was not found") off."""
    from vitsink_jax.data import tfds_io

    tfds_io.write_builder([{"q": "a"}], "quiet", tmp_path, {"q": "text"})
    assert capsys.readouterr().out == ""
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
    seen = []
    cli.main_of(lambda argv: seen.append(os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")))([])
    assert seen == ["1"]
