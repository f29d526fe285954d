"""evaluate.py's results are written aside and moved in when the mode ends
(vitsink_jax.outputs): an interrupted or failing run leaves the previous run's results as they
were, and says so in one line (exit 130 for Ctrl-C). Score mode (no model) is the run."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_scores import ROOT, default_config, pope_items, write_table
from vitsink_jax import outputs, plots


def pope_files(tmp_path, answer: str):
    """(benchmark .tsv, VLMEvalKit predictions .tsv answering ``answer`` to every question)."""
    bench = write_table(tmp_path / "pope.tsv", [
        dict(index=it["index"], question=f"Is there a thing {it['index']}?",
             answer=it["answer"].capitalize(), category=it["category"], image="x")
        for it in pope_items()])
    preds = write_table(tmp_path / f"preds_{answer}.tsv", [
        dict(index=it["index"], question=f"Is there a thing {it['index']}?", prediction=answer)
        for it in pope_items()], quoting=csv.QUOTE_ALL)
    return bench, preds


def score_config(bench, preds):
    return default_config(**{"benchmark.name": "pope", "benchmark.file": str(bench),
                             "score.predictions": str(preds)})


def results(work):
    return {p.name: p.read_bytes() for p in sorted(work.iterdir())}


def test_interrupted_or_failing_run_keeps_the_previous_results(tmp_path, monkeypatch):
    """A run interrupted after its results.json was written (before its predictions) leaves the
    previous results.json and scored_predictions.jsonl byte for byte and nothing of its own; so
    does one that fails there; a finished run replaces both."""
    from vitsink_jax.modes import score

    bench, yes = pope_files(tmp_path, "Yes")
    _, no = pope_files(tmp_path, "No")
    work = tmp_path / "work"
    with outputs.session(work):
        score.run_score(score_config(bench, yes), work)
    before = results(work)
    assert sorted(before) == ["results.json", "scored_predictions.jsonl"]

    for fault in (KeyboardInterrupt, OSError):
        def fails(path, rows, fault=fault):
            assert json.loads(outputs.staged(work / "results.json").read_text())["predictions"] == str(no)
            raise fault("stopped")

        monkeypatch.setattr(score, "write_jsonl", fails)
        with pytest.raises(fault), outputs.session(work):
            score.run_score(score_config(bench, no), work)
        assert results(work) == before  # (and no staging folder left)
    monkeypatch.undo()
    with outputs.session(work):
        score.run_score(score_config(bench, no), work)
    assert json.loads((work / "results.json").read_text())["predictions"] == str(no)
    assert sorted(results(work)) == ["results.json", "scored_predictions.jsonl"]


def test_plots_and_subfolders_are_staged(tmp_path):
    """A figure under workdir/plots exists only once the session ends (and outside a session
    is written straight away); a path outside the workdir is not staged."""
    work = tmp_path / "work"
    with outputs.session(work) as folder:
        path = plots.norm_histogram({"a": np.arange(10.0)}, 5.0, work / "vit" / "plots" / "h.png")
        assert path == work / "vit" / "plots" / "h.png" and not path.exists()
        assert (folder / "vit" / "plots" / "h.png").is_file()
        assert outputs.staged(tmp_path / "elsewhere.json") == tmp_path / "elsewhere.json"
    assert path.stat().st_size > 1000 and os.listdir(work) == ["vit"]
    assert plots.norm_histogram({"a": np.arange(10.0)}, 5.0, tmp_path / "b.png").is_file()


INTERRUPTED_RUN = """
import sys
sys.argv = ["evaluate.py"] + sys.argv[1:]
import evaluate
from absl import app
from vitsink_jax import cli
from vitsink_jax.modes import score

def interrupted(path, rows):  # Ctrl-C after results.json, before the predictions
    raise KeyboardInterrupt

score.write_jsonl = interrupted
evaluate.define_flags()
app.run(cli.main_of(evaluate.main))
"""


def test_ctrl_c_in_evaluate_says_one_line_and_exits_130(tmp_path):
    """The CLI: no traceback, one line naming the workdir, exit status 130, the previous
    results untouched."""
    bench, preds = pope_files(tmp_path, "Yes")
    work = tmp_path / "work"
    work.mkdir()
    (work / "results.json").write_text('{"previous": true}\n')
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_RUN, f"--workdir={work}",
                           "--config.mode=score", "--config.benchmark.name=pope",
                           f"--config.benchmark.file={bench}", f"--config.score.predictions={preds}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"interrupted: {work} keeps the previous results"]
    assert sorted(os.listdir(work)) == ["log.txt", "results.json"]
    assert (work / "results.json").read_text() == '{"previous": true}\n'
