"""``gs://`` workdirs (issue 32 part 3), offline: train.py (two checkpoints, a killed run resumed,
its export) and evaluate.py (reading that export from the bucket) with ``--workdir
gs://bucket/...`` write what the same runs write in a local workdir.

The bucket is a local folder: :func:`install` registers a fake fsspec ``gs`` / ``gcs``
filesystem (gcsfs's protocol, which etils.epath uses without TensorFlow) mapping
``gs://bucket/x`` to ``<root>/bucket/x``, and maps orbax's tensorstore kvstore spec of a
``gs://`` path (``gcs_utils.get_kvstore_for_gcs``) to tensorstore's ``file`` driver on that
folder; orbax's question to the bucket's API (hierarchical namespace?) answers no. So
tensorstore's GCS driver itself is untested; everything above it (orbax's GCS code path with its
commit files, epath, this package) is. The CLIs run as scripts in a subprocess that installs the
fake first, from an empty working folder: a ``pathlib.Path(workdir)`` anywhere turns
``gs://bucket/run`` into a local ``gs:/bucket/run`` there, which the test refuses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--config.embedded.image_size=56", "--config.embedded.vision_hidden=48",
         "--config.embedded.vision_layers=2", "--config.embedded.text_hidden=64",
         "--config.embedded.text_layers=2", "--config.embedded.vocab_size=512",
         "--config.data.variants=1", "--config.data.image_size=56", "--config.batch_size=8",
         "--config.checkpoint_every=2", "--config.log_every=1"]


def install(root: str, mp=None) -> None:
    """``gs://bucket/x`` -> ``<root>/bucket/x`` for etils.epath (fsspec) and orbax (tensorstore);
    ``mp``: a pytest monkeypatch that undoes it (else it stays, as in a CLI's process)."""
    from fsspec.registry import _registry  # (fsspec.registry is its read-only view)
    from etils.epath import backend
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from orbax.checkpoint._src.path import gcs_utils

    class FakeGCS(DirFileSystem):
        protocol, cachable = ("gs", "gcs"), False

        def __init__(self, *args, **kwargs):  # (epath passes gcsfs's finalize_on_close)
            super().__init__(path=root, fs=LocalFileSystem())

        @classmethod
        def _strip_protocol(cls, path):
            return path.split("://", 1)[-1]

    mp = mp or pytest.MonkeyPatch()
    for name in FakeGCS.protocol:
        mp.setitem(_registry, name, FakeGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()

    def kvstore(path):
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": f"{root}/{bucket}/{key}"}

    mp.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    mp.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The fake bucket ``gs://bucket`` (this process), as its local folder."""
    from etils.epath import backend

    install(str(tmp_path / "gcs"), monkeypatch)
    yield tmp_path / "gcs" / "bucket"
    backend.fsspec_backend._get_filesystem.cache_clear()


def run(script: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """``python <script> *flags`` from an empty folder, with the fake bucket ``tmp_path/bucket``
    installed first; fails the test on a non-zero exit or anything written into that folder."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    code = (f"import runpy, sys; sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]; "
            f"import test_gcs_paths; test_gcs_paths.install({str(tmp_path / 'gcs')!r}); "
            f"sys.argv = {[script, *flags]!r}; runpy.run_path({str(ROOT / script)!r}, run_name='__main__')")
    # one compile cache for the test's runs, one after another (a repeat run loads the programs
    # an earlier one compiled: half the CPU of a train.py run; the cache's writes are unlocked,
    # so never for processes running together)
    env = {**os.environ, "VITSINK_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT),
           "VITSINK_JAX_CACHE": str(tmp_path / "xla")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(cwd.iterdir()), f"{script} wrote into the working folder: {list(cwd.iterdir())}"
    return proc


def losses(workdir: Path) -> list:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_train_and_evaluate_in_a_gs_workdir_match_a_local_one(tmp_path):
    """(~75 s of CPU, more on a busy machine: three train.py and two evaluate.py runs, each a
    process of its own, as the fake bucket must be installed before the CLI starts. The local
    reference trains 4 steps straight: tests/test_train.py shows a resumed run equal to a
    straight one.)"""
    bucket, local = tmp_path / "gcs" / "bucket", tmp_path / "local"
    cfg = f"--config={ROOT / 'configs' / 'diysink.py'}"
    run("train.py", tmp_path, cfg, f"--workdir={local}", "--config.steps=4", *TRAIN)
    for steps in (2, 4):  # killed after 2 steps, resumed to 4
        run("train.py", tmp_path, cfg, "--workdir=gs://bucket/run", f"--config.steps={steps}", *TRAIN)
    gs = bucket / "run"
    summary = json.loads((gs / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["export"] == "gs://bucket/run/export"
    assert losses(gs) == losses(local) and len(losses(gs)) == 4
    assert sorted(p.name for p in (gs / "checkpoints").iterdir() if p.name[0] != ".") == ["2", "4"]
    assert (gs / "checkpoints" / "4" / "commit_success.txt").is_file()  # orbax's GCS atomicity
    assert (gs / "checkpoints" / "4" / "checksums.json").is_file()  # checked before a resume
    assert sorted(p.name for p in (gs / "export").iterdir()) == sorted(p.name for p in (local / "export").iterdir())
    for name, value in weights(local / "export").items():
        np.testing.assert_array_equal(weights(gs / "export")[name], value, err_msg=name)
    assert (gs / "log.txt").read_text().count("losses: first") == 2  # both runs, appended
    assert list((gs / "tb").glob("events.out.tfevents.*"))
    assert not (gs / "tfds").exists()  # the data build stays local: VITSINK_CACHE/remote/gs/...
    assert (tmp_path / "cache" / "remote" / "gs" / "bucket" / "run" / "tfds").is_dir()

    evaluate = [f"--config={ROOT / 'configs' / 'default.py'}", "--config.mode=benchmark",
                "--config.benchmark.limit=6", '--config.variants=("none",)',
                "--config.benchmark.image_size=56"]
    run("evaluate.py", tmp_path, *evaluate, f"--workdir={tmp_path / 'eval'}",
        f"--config.checkpoint={local / 'export'}")
    run("evaluate.py", tmp_path, *evaluate, "--workdir=gs://bucket/eval",
        "--config.checkpoint=gs://bucket/run/export")
    ours, theirs = (json.loads((w / "results.json").read_text()) for w in (bucket / "eval", tmp_path / "eval"))
    assert ours["results"] == theirs["results"] and ours["checkpoint_sha256"] == theirs["checkpoint_sha256"]
    assert (bucket / "eval" / "predictions_none.jsonl").read_text() == \
        (tmp_path / "eval" / "predictions_none.jsonl").read_text()


def test_a_gs_data_dir_and_per_process_checkpoints_in_a_bucket_are_refused():
    from vitsink_jax import paths
    from vitsink_jax.checkpoints import StateCheckpoints

    with pytest.raises(SystemExit, match=r"--config.data.data_dir=gs://bucket/tfds: data builds need a local"):
        paths.data_dir("gs://bucket/tfds", "runs/x", "data.data_dir")
    assert paths.data_dir("", "runs/x", "data.data_dir") == Path("runs/x/tfds")
    with pytest.raises(ValueError, match="per_process writes local files, not gs://bucket/run"):
        StateCheckpoints("gs://bucket/run", 2, "per_process")


def test_score_mode_reads_benchmark_and_predictions_from_a_bucket(bucket, tmp_path):
    """evaluate.py's score mode with the benchmark, the predictions and the workdir on gs://
    writes what it writes from local files (in this process: score mode loads no model)."""
    from test_scores import default_config, pope_items, write_table

    from vitsink_jax import paths
    from vitsink_jax.modes.score import run_score

    bench = [dict(index=it["index"], question=f"Is there a thing {it['index']}?",
                  answer=it["answer"].capitalize(), category=it["category"], image="x")
             for it in pope_items()]
    preds = [dict(index=it["index"], question=f"Is there a thing {it['index']}?", prediction=it["response"])
             for it in pope_items()]
    reports = {}
    for where, root in (("local", tmp_path / "local"), ("gs", bucket)):
        root.mkdir(parents=True)
        write_table(root / "pope.tsv", bench)
        write_table(root / "preds.tsv", preds)
        uri = "gs://bucket" if where == "gs" else str(root)
        cfg = default_config(**{"benchmark.name": "pope", "benchmark.file": f"{uri}/pope.tsv",
                                "score.predictions": f"{uri}/preds.tsv"})
        run_score(cfg, paths.path(f"{uri}/work"))
        reports[where] = json.loads((root / "work" / "results.json").read_text())
        assert (root / "work" / "scored_predictions.jsonl").is_file()
    for key in ("official", "counts", "unparsed", "file_sha256", "predictions_sha256"):
        assert reports["gs"][key] == reports["local"][key], key
