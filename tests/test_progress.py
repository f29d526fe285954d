"""Progress reporting off a terminal (one line per tenth of the work or per minute, the figures
of a bar) and the CLIs' log file (whole time-stamped lines, bar refreshes collapsed)."""

import io
import sys

import pytest

from vitsink_jax import cli, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_every_tenth_every_minute_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = progress.ProgressLines(total=40, desc="scoring", unit="batch", file=out, clock=clock)
    for _ in range(4):  # a tenth of the work: one line
        clock.now += 1
        bar.update()
    bar.set_postfix(loss="1.2500")
    clock.now += 61     # a minute without a new tenth: one line
    bar.update()
    bar.close()         # nothing new since the last line: no line
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0] == "scoring:  10% 4/40 batch [0:00:04, 1.00 batch/s, ETA 0:00:36]"
    assert lines[1].startswith("scoring:  12% 5/40 batch [0:01:05, 0.08 batch/s, ETA 0:07:35]")
    assert lines[1].endswith("loss=1.2500")


def test_iteration_resumes_at_initial_and_modes(monkeypatch):
    out = io.StringIO()
    bar = progress.ProgressLines(range(8, 10), initial=8, total=10, desc="train", file=out, clock=Clock())
    assert list(bar) == [8, 9]
    assert out.getvalue().splitlines()[-1].startswith("train: 100% 10/10 it")
    monkeypatch.setenv("VITSINK_JAX_PROGRESS", "off")
    assert list(progress.progress(range(3))) == [0, 1, 2]
    monkeypatch.setenv("VITSINK_JAX_PROGRESS", "lines")
    assert isinstance(progress.progress(total=2), progress.ProgressLines)
    monkeypatch.setenv("VITSINK_JAX_PROGRESS", "bars")
    with pytest.raises(ValueError, match="VITSINK_JAX_PROGRESS='bars' is not one of bar, lines, off"):
        progress.mode()


def test_log_file_has_whole_lines_and_what_ended_the_run(tmp_path):
    log = tmp_path / "work" / "log.txt"
    with cli.log_to(log):
        print("first line")
        sys.stderr.write("bar 10%\rbar 50%\rbar 100%\n")
        sys.stdout.write("partial ")
        sys.stdout.write("line\n")
    with pytest.raises(SystemExit):
        with cli.log_to(log):
            raise SystemExit("error: the checkpoint is missing")
    with pytest.raises(KeyError):
        with cli.log_to(log):
            raise KeyError("a bug")
    text = [line[20:] for line in log.read_text().splitlines()]  # after "YYYY-mm-dd HH:MM:SS "
    assert text[:4] == ["first line", "bar 100%", "partial line", "error: the checkpoint is missing"]
    assert text[4] == "Traceback (most recent call last):" and text[-1] == "KeyError: 'a bug'"
