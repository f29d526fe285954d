"""Train-state checkpoints are checked before use (issue 35 point 5): a damaged newest one (a
file deleted, truncated or changed, in every kind of file a checkpoint holds) is set aside by
name and the one before it is used; a run stopped by SIGTERM saves and resumes bit for bit
(point 6)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from test_train import ROOT, SMALL, config, params_of, same
from vitsink_jax import checksums, trainer
from vitsink_jax.checkpoints import UNCHECKED, StateCheckpoints

STATE = {"step": jnp.asarray(3, jnp.int32), "w": jnp.linspace(-1, 1, 4000, dtype=jnp.float32),
         "opt": {"mu": jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4)}}

# the kinds of files a checkpoint holds, by storage: array data, orbax's metadata JSON, our meta
# (the run's settings and data position), the checksums themselves
FILES = {"global": {"array data": "state/ocdbt.process_0/d/*", "metadata json": "state/_METADATA",
                    "our meta": "meta/metadata", "checksums": checksums.MANIFEST},
         "per_process": {"array data": "state.npz", "our meta": "meta.json",
                         "checksums": checksums.MANIFEST}}


def state_at(step: int):
    return jax.tree_util.tree_map(lambda x: x + step, STATE)


def biggest(folder: Path, pattern: str) -> Path:
    return max(folder.glob(pattern), key=lambda f: f.stat().st_size)


def damage(f: Path, fault: str) -> None:
    """Deletes ``f``, cuts it to half its size, or flips up to 64 of its bytes (in the middle)."""
    if fault == "delete":
        f.unlink()
    elif fault == "truncate":
        os.truncate(f, f.stat().st_size // 2)
    else:
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        for i in range(max(0, mid - 32), min(len(data), mid + 32)):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))


def saved(tmp_path, storage: str, steps=(1, 2)) -> StateCheckpoints:
    ckpts = StateCheckpoints(tmp_path / "ckpt", keep=3, storage=storage)
    for step in steps:
        ckpts.save(step, state_at(step), {"data_step": step})
    return ckpts


@pytest.mark.parametrize("fault", ["delete", "truncate", "flip"])
@pytest.mark.parametrize("storage,kind", [(s, k) for s, kinds in FILES.items() for k in kinds])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_used(tmp_path, capsys, storage,
                                                                          kind, fault):
    """Each kind of file of the newest checkpoint deleted, truncated or with 64 bytes flipped: a
    resume sets that checkpoint aside (``2.damaged-<time>``, one line naming the file) and
    restores the one before bitwise; the run's own saves are trusted without rereading."""
    ckpts = saved(tmp_path, storage)
    assert ckpts.latest_step() == 2 and capsys.readouterr().out == ""
    target = biggest(ckpts.directory / "2", FILES[storage][kind])
    damage(target, fault)
    again = StateCheckpoints(tmp_path / "ckpt", keep=3, storage=storage)
    assert again.latest_step() == 1
    [aside] = [p.name for p in again.directory.iterdir() if p.name.startswith("2.")]
    assert re.fullmatch(r"2\.damaged-\d{8}T\d{6}", aside)
    [line] = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"checkpoint step 2 in {re.escape(str(again.directory))} is damaged: "
                        rf".+; set aside as {aside}", line)
    assert str(target.relative_to(ckpts.directory / "2")) in line
    same(again.restore(1, STATE), state_at(1))
    assert again.meta(1) == {"data_step": 1} and again.latest_step() == 1


@pytest.mark.parametrize("storage", ["global", "per_process"])
def test_no_intact_checkpoint_is_one_error_line(tmp_path, storage):
    ckpts = saved(tmp_path, storage)
    for step in (1, 2):
        damage(biggest(ckpts.directory / str(step), FILES[storage]["array data"]), "flip")
    with pytest.raises(SystemExit, match=r"^error: no intact checkpoint in .*ckpt \(set aside: "
                       r"2.damaged-\S+, 1.damaged-\S+\); run again to start from step 0") as e:
        StateCheckpoints(tmp_path / "ckpt", keep=3, storage=storage).latest_step()
    assert "\n" not in str(e.value.code)


@pytest.mark.parametrize("storage", ["global", "per_process"])
def test_checkpoints_older_than_checksums_resume_unchecked_and_newer_ones_need_theirs(tmp_path, storage):
    """Steps a folder held before checksums were recorded (no manifest, no record of unchecked
    steps) resume as they are; a later step without its manifest is set aside."""
    ckpts = saved(tmp_path, storage)
    (ckpts.directory / UNCHECKED).unlink()
    for step in (1, 2):
        (ckpts.directory / str(step) / checksums.MANIFEST).unlink()
    old = StateCheckpoints(tmp_path / "ckpt", keep=3, storage=storage)
    assert old.latest_step() == 2
    assert json.loads((old.directory / UNCHECKED).read_text()) == {"steps": [1, 2]}
    old.save(3, state_at(3), {"data_step": 3})
    (old.directory / "3" / checksums.MANIFEST).unlink()
    assert StateCheckpoints(tmp_path / "ckpt", keep=3, storage=storage).latest_step() == 2
    assert any(p.name.startswith("3.damaged-") for p in old.directory.iterdir())


def test_checksums_read_files_in_pieces(tmp_path):
    """Hashing a 32 MiB file holds no more than a few MiB (1 MiB reads, not the whole file)."""
    (tmp_path / "big").write_bytes(bytes(32 << 20))
    tracemalloc.start()
    checksums.write(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20 and checksums.damage(tmp_path) is None


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step train.py run, a checkpoint after every step (the newest 2 kept):
    what the interrupted runs below must equal."""
    work = tmp_path_factory.mktemp("straight")
    trainer.train(config(steps=6, checkpoint_every=1), work)
    return work


@pytest.mark.slow
def test_a_run_resumes_past_a_damaged_checkpoint_as_from_the_one_before(straight, tmp_path):
    """The newest checkpoint of a finished run with 64 bytes flipped in an array data file
    (before: resumed "successfully" from it): train.py sets it aside, resumes from the step
    before and ends with the uninterrupted run's weights and losses bit for bit."""
    work = tmp_path / "run"
    shutil.copytree(straight, work, ignore=shutil.ignore_patterns("export"))  # (the copy's own to write)
    damage(biggest(work / "checkpoints" / "6", FILES["global"]["array data"]), "flip")
    summary = trainer.train(config(steps=6, checkpoint_every=1), work)
    assert summary["resumed_from"] == 5
    assert any(p.name.startswith("6.damaged-") for p in (work / "checkpoints").iterdir())
    same(params_of(work), params_of(straight))
    assert trainer.loss_curve(work) == trainer.loss_curve(straight)


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_the_same_command_resumes_bit_for_bit(straight, tmp_path):
    """A real SIGTERM sent to train.py once its first step is logged: it saves a checkpoint at
    the end of the step it arrived in (the only one: none is due before step 100), exits 0 with
    one line saying where and how to resume; the resume ends with the uninterrupted run's
    weights and losses bit for bit. (~40 s: a train.py process of its own, as a preempted
    machine runs it, plus the resume.)"""
    work = tmp_path / "run"
    options = [f"--config.embedded.{k}={v}" for k, v in SMALL.items()] + [
        "--config.data.variants=1", "--config.data.image_size=56", "--config.steps=6",
        "--config.batch_size=8", "--config.checkpoint_every=100", "--config.log_every=1"]
    proc = subprocess.Popen([sys.executable, "train.py", "--config=configs/diysink.py",
                             f"--workdir={work}", *options], cwd=ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics, deadline = work / "metrics.jsonl", time.time() + 300
    while not (metrics.is_file() and metrics.read_text().strip()):  # step 0 done
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "Traceback" not in out and "error" not in out, out
    [line] = [x for x in out.splitlines() if x.startswith("stopped by")]
    stopped = re.fullmatch(r"stopped by SIGTERM after step (\d) of 6: checkpoint \1 saved in (\S+); "
                           r"resume with the same command: python train.py --config=configs/diysink.py "
                           rf"--workdir={re.escape(str(work))} .*--config.log_every=1", line)
    assert stopped and 1 <= int(stopped[1]) < 6 and stopped[2] == str(work / "checkpoints"), line
    assert not (work / "export").exists()
    summary = trainer.train(config(steps=6, checkpoint_every=100), work)
    assert summary["resumed_from"] == int(stopped[1])
    same(params_of(work), params_of(straight))
    assert trainer.loss_curve(work) == trainer.loss_curve(straight)


def test_sigterm_only_notes_the_request_and_the_handler_is_put_back():
    from vitsink_jax import preemption

    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopRequest() as stop:
        assert not stop.due(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.due(2) and stop.signal == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_several_processes_stop_at_jax_preemption_sync_point(monkeypatch):
    """With several processes every host must save the same step: the loop asks JAX's
    preemption sync point, and no handler of ours replaces the notifier jax.distributed set up."""
    from jax.experimental import multihost_utils

    from vitsink_jax import preemption

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(preemption, "_sync_manager", lambda: object())
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 3)
    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) is before
        assert [stop.due(step) for step in (1, 2, 3)] == [False, False, True]
        assert stop.signal == "a preemption notice"
