"""Nothing starts wrong (issue 35, points 3, 7 and 9): one run per workdir (a lock taken before
anything is written, a second run refused by name, a stale lock taken over, the processes of
one run not refusing each other), every setting checked before anything loads (the config's
values by one table, the environment, misspelt keys, a missing config file: one ``error:``
line, exit 2), and a checkpoint of a family we do not run named in one line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest
from absl import flags, logging

import vitsink_jax as vj
from vitsink_jax import cli, options, run_lock, trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import train  # noqa: E402

# train.py on a tiny embedded model (as tests/test_train.py's SMALL)
TINY = ["--config.embedded.image_size=56", "--config.embedded.vision_hidden=48",
        "--config.embedded.vision_layers=2", "--config.embedded.text_hidden=64",
        "--config.embedded.text_layers=2", "--config.embedded.vocab_size=512",
        "--config.data.variants=1", "--config.data.image_size=56", "--config.steps=2",
        "--config.batch_size=4"]


@pytest.fixture
def cli_flags(tmp_path):
    """The CLI's flags (``--verbose``, ``--workdir``) parsed, the workdir in ``tmp_path``."""
    if "verbose" not in flags.FLAGS:
        cli.define_verbose()
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", None, "test workdir")
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["test"])
    flags.FLAGS.workdir = str(tmp_path / "work")
    level = logging.get_verbosity()
    yield flags.FLAGS
    flags.FLAGS.workdir, flags.FLAGS.verbose = None, False
    logging.set_verbosity(level)


def holder_of(lock: Path, timeout: float = 120) -> dict:
    """The holder a lock file names, once it exists and is written."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            return json.loads(lock.read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise AssertionError(f"{lock} never appeared")


def tree(folder: Path) -> dict:
    """{path: (size, mtime)} of everything under ``folder``."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_second_run_in_a_held_workdir_is_refused_by_name_and_writes_nothing(tmp_path, cli_flags,
                                                                            capsys):
    """Two real train.py processes: the second, started while the first holds the lock (the
    first paused there), exits 1 with one line naming the holder and the lock file and writes
    nothing. The first is then killed as a crash would end it: the lock it leaves is stale
    (its pid dead on this host), and the next run takes it over with a warning, in its log
    too, and removes it at its end; a run ended by Ctrl-C removes it too.
    (~15 s: two process starts of train.py.)"""
    work = Path(cli_flags.workdir)
    lock = work / "run.lock"
    cmd = [sys.executable, "train.py", f"--workdir={work}", *TINY]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        holder = holder_of(lock)
        os.kill(first.pid, signal.SIGSTOP)
        before = tree(work)
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert tree(work) == before
    finally:
        first.kill()
        first.communicate()
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    assert holder["command"].startswith("train.py --workdir=")
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines() == [
        f"error: workdir {work} is in use by pid {first.pid} on host {socket.gethostname()} since "
        f"{holder['since']} ({holder['command']}) (one run per workdir: wait for it to end or use "
        f"another --workdir; lock file {lock}) (--verbose shows the traceback)"]
    assert lock.is_file()  # the killed run's: stale

    def main(argv):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        print("ran")

    cli.main_of(main)([])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: taking over the stale lock {lock} of pid {first.pid} on host "
                          f"{socket.gethostname()} since {holder['since']}")
    assert err.rstrip().endswith(f"pid {first.pid} is not running")
    assert "warning: taking over the stale lock" in (work / "log.txt").read_text()
    assert not lock.exists()

    def interrupted(argv):
        assert lock.is_file()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli.main_of(interrupted)([])
    assert not lock.exists()


def lock_file(folder: Path, name: str = "run.lock", **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "then",
                                "command": "python train.py", "run": None, **holder}))
    return path


def test_a_lock_that_cannot_be_judged_stale_is_refused_with_what_to_do(tmp_path):
    """A lock of another host is never taken over (its pid means nothing here), nor one whose
    pid runs on this host (the pid may have been reused: the file is named for removal); the
    file is left as it was."""
    for holder, why in [(dict(host="tpu-vm-7", pid=4242), "another host's run: judge there whether it "
                         "still runs; remove the lock file once that run is over"),
                        (dict(pid=os.getppid()), "its pid runs but holds no lock: if it is no vitsink_jax "
                         "run, the pid was reused; remove the lock file once that run is over")]:
        path = lock_file(tmp_path, **holder)
        text = path.read_text()
        with pytest.raises(run_lock.WorkdirLocked) as e:
            with run_lock.workdir_lock(tmp_path):
                pass
        assert str(e.value).endswith(f"({why}; lock file {path})")
        assert path.read_text() == text


def dist(**kw):
    return ml_collections.ConfigDict({**dict(mode="auto", coordinator="", num_processes=1,
                                             process_id=0, local_device_count=0), **kw})


def test_the_processes_of_one_run_do_not_refuse_each_other_but_another_run_is_refused(tmp_path):
    """Each process of a run whose process ids are known beforehand holds ``run.<id>.lock``,
    recording the run (its coordinator, a launcher's job): a process of the same run in the same
    workdir passes, a one-process run or another job there is refused by the other's file."""
    one, two = dist(coordinator="10.0.0.1:1234", num_processes=2), dist(
        coordinator="10.0.0.1:1234", num_processes=2, process_id=1)
    with run_lock.workdir_lock(tmp_path, one) as notice:
        assert notice is None and json.loads((tmp_path / "run.0.lock").read_text())["run"] == (
            "coordinator 10.0.0.1:1234")
        with run_lock.workdir_lock(tmp_path, two):
            assert sorted(p.name for p in tmp_path.iterdir()) == ["run.0.lock", "run.1.lock"]
        with pytest.raises(run_lock.WorkdirLocked, match=r"another run in this workdir.*lock file "
                           + str(tmp_path / "run.0.lock")):
            with run_lock.workdir_lock(tmp_path):
                pass
        slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
        with pytest.raises(run_lock.WorkdirLocked):
            with run_lock.workdir_lock(tmp_path, dist(), slurm):
                pass
        assert run_lock.run_id(dist(), slurm) == "SLURM 77"
    assert list(tmp_path.iterdir()) == []


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path, cli_flags, capsys):
    """The lock and the log are opened inside the error handler: a workdir that cannot be
    created is one line naming it, exit 1 (the log was opened before the handler: a traceback)."""
    (tmp_path / "file").write_text("")
    cli_flags.workdir = str(tmp_path / "file" / "run")
    with pytest.raises(SystemExit) as e:
        cli.main_of(lambda argv: None)([])
    assert e.value.code == 1
    assert capsys.readouterr().err == (f"error: Not a directory: {tmp_path / 'file' / 'run'} "
                                       "(--verbose shows the traceback)\n")


def config_file(name: str, argument: str = ""):
    return options.load_config_file(str(ROOT / "configs" / f"{name}.py") + argument)


@pytest.mark.parametrize("name,key,value,message", [
    ("diysink", "steps", -3, "--config.steps=-3 must be >= 0"),
    ("diysink", "batch_size", 0, "--config.batch_size=0 must be >= 1"),
    ("diysink", "checkpoint_every", 0, "--config.checkpoint_every=0 must be >= 1"),
    ("diysink", "keep_checkpoints", 0, "--config.keep_checkpoints=0 must be >= 1"),
    ("diysink", "log_every", 0, "--config.log_every=0 must be >= 1"),
    ("diysink", "optim.warmup_ratio", 1.5, "--config.optim.warmup_ratio=1.5 must be in [0, 1]"),
    ("diysink", "optim.lrs.projectors", -1e-3, "--config.optim.lrs.projectors=-0.001 must be >= 0"),
    ("diysink", "diysink.rule.rule", "top-k", "--config.diysink.rule.rule='top-k' is not one of "
     "threshold, topk, adaptive"),
    ("diysink", "embedded.text_layers", 0, "--config.embedded.text_layers=0 must be >= 1"),
    ("diysink", "optim.loss_group_rows", 3, None),  # the default loss_average: not used
    ("diysink", "distributed.process_id", 1, "--config.distributed.process_id=1 must be below "
     "--config.distributed.num_processes=1"),
    ("default", "benchmark.limit", -5, "--config.benchmark.limit=-5 must be >= 0"),
    ("default", "eval.batch_size", 0, "--config.eval.batch_size=0 must be >= 1"),
    ("default", "sweep.taus", (20.0, -1.0), "--config.sweep.taus=(20.0, -1.0) item 1 (-1.0) must be > 0"),
    ("default", "variants", ("none", "fornt"), "--config.variants=('none', 'fornt') item 1 ('fornt') is "
     "refused: visual token order 'fornt' not one of ('none', 'front', 'end')"),
    ("default", "compare.specs", ("stock", "fastv:half"), "--config.compare.specs=('stock', 'fastv:half') "
     "item 1 ('fastv:half') is refused: intervention 'fastv:half': could not convert string to float: 'half'"),
    ("default", "bucket_edges", (0.0, 20.0, 10.0), "--config.bucket_edges=(0.0, 20.0, 10.0) must be "
     "strictly increasing"),
    ("diysink", "diysink.question_encoder", "mean", "--config.diysink.question_encoder='mean' is refused: "
     "no question encoder 'mean'; registered: mean_embed, token_histogram"),
    ("default", "mode", "studdy", "--config.mode='studdy' is not one of study, demo, analyze, "
     "benchmark, vit, interventions, score, sweep"),
])
def test_each_config_value_is_checked_by_name(name, key, value, message):
    """The shipped configs pass; a value out of its range or set is refused naming the flag and
    what it may be (evaluate.py adds its modes)."""
    cfg = config_file(name)
    check = evaluate.check_config if name == "default" else options.check_config
    check(cfg)
    cfg.update_from_flattened_dict({key: value})
    if message is None:
        check(cfg)
        return
    with pytest.raises(options.ConfigError) as e:
        check(cfg)
    # (startswith: a test in the same process may have registered another question encoder)
    assert str(e.value) == message or key == "diysink.question_encoder" and str(e.value).startswith(message)


def test_every_shipped_config_passes():
    for name, argument in [("mini_study", ""), ("tinyllava_0p5b_diysink", ":finetune"),
                           ("tinyllava_3b_diysink", ""), ("llava15_diysink", ":finetune")]:
        options.check_config(config_file(name, argument))


def test_training_checks_before_it_loads_or_writes_anything(tmp_path):
    """``steps=-3`` used to export the untrained model with exit 0; a recipe's bad override of
    a later run stops the recipe before its first run starts."""
    cfg = config_file("diysink")
    cfg.steps = -3
    with pytest.raises(options.ConfigError, match=r"^--config.steps=-3 must be >= 0$"):
        trainer.train(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    cfg = config_file("mini_study")
    cfg.recipe = ("single: diysink.enabled=False", "later: keep_checkpoints=0")
    cfg.publish = {}
    with pytest.raises(options.ConfigError, match=r"^recipe run 'later': --config.keep_checkpoints=0 "
                       r"must be >= 1$"):
        train.run_recipe(cfg, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_environment_is_checked():
    options.check_environment({"VITSINK_JAX_PROGRESS": " Lines "})
    with pytest.raises(options.ConfigError, match=r"^environment variable VITSINK_JAX_PROGRESS='bars' "
                       r"is not one of bar, lines, off"):
        options.check_environment({"VITSINK_JAX_PROGRESS": "bars"})
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "two",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    with pytest.raises(options.ConfigError, match=r"SLURM_NTASKS='two' is not a process count / id"):
        options.check_environment(slurm)


def test_the_command_line_is_checked_against_the_config_file(monkeypatch):
    monkeypatch.chdir(ROOT)
    options.check_command_line(["evaluate.py", "--config.mode=benchmark", "--noconfig.eval.share_prefixes",
                                "--config.sink.rule", "topk"], "configs/default.py")
    for argv, message in [
            (["e", "--config.mdoe=x"], "--config.mdoe: no such key; did you mean --config.mode?"),
            (["e", "--config.benchmark.limt=3"], "--config.benchmark.limt: no such key; did you mean "
             "--config.benchmark.limit?"),
            (["t", "--config", "configs/diysink.py", "--config.optim.lrs.projector=1"],
             "--config.optim.lrs.projector: no such key; did you mean --config.optim.lrs.projectors?"),
            (["e", "--config=configs/nope.py"], f"--config=configs/nope.py: config file configs/nope.py "
             f"does not exist (relative to {ROOT})"),
            (["e", "--config=configs/tinyllava_3b_diysink.py:midtrain"],
             "--config=configs/tinyllava_3b_diysink.py:midtrain: get_config failed: KeyError: 'midtrain'")]:
        with pytest.raises(options.ConfigError) as e:
            options.check_command_line(argv, "configs/default.py")
        assert str(e.value) == message


def test_a_bad_setting_is_one_line_with_status_2_before_anything_is_written(tmp_path, cli_flags, capsys):
    """main_of checks the config before it takes the lock or opens the log: nothing is
    written (``--config.steps=-3`` used to export the untrained model with exit 0)."""
    cfg = config_file("diysink")
    cfg.steps = -3
    with pytest.raises(SystemExit) as e:
        cli.main_of(lambda argv: None, lambda config: options.check_config(cfg))([])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --config.steps=-3 must be >= 0 (--verbose shows the traceback)\n"
    assert not Path(cli_flags.workdir).exists()


@pytest.mark.slow
def test_the_scripts_end_a_flag_parsing_error_in_one_line_with_status_2(tmp_path):
    """The whole CLIs (5 process starts side by side: ~12 s alone, ~23 s beside
    another test): a misspelt key and a missing
    config file failed inside absl's flag parsing, before main, in a traceback; a stray
    positional argument was ignored (``evaluate.py benchmark`` ran the default mode). Run from
    another directory, the scripts find their own default configs, and ``--config.help`` lists
    the keys with their defaults and notes."""
    work = tmp_path / "w"
    runs = [(["evaluate.py", "--config.mdoe=x"], ROOT,
             "error: --config.mdoe: no such key; did you mean --config.mode?"),
            (["train.py", "--config=configs/nope.py"], ROOT, "error: --config=configs/nope.py: config file "
             f"configs/nope.py does not exist (relative to {ROOT})"),
            ([str(ROOT / "evaluate.py"), "benchmark"], tmp_path, "error: unexpected argument(s) 'benchmark': "
             "every setting is a flag, e.g. --config.mode=benchmark (--config.help lists the keys)"),
            ([str(ROOT / "train.py"), "--config.help"], tmp_path, "  --config.steps=40\n      optimizer updates\n"),
            # the console script pip installs (pyproject's [project.scripts])
            ([str(Path(sys.executable).parent / "vitsink-eval"), "--config.help"], tmp_path,
             "  --config.mode='study'\n")]
    procs = [subprocess.Popen([sys.executable, *args, f"--workdir={work}"], cwd=cwd, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args, cwd, _ in runs]
    for proc, (args, _, line) in zip(procs, runs):
        out, err = proc.communicate(timeout=120)
        if args[-1] == "--config.help":
            assert proc.returncode == 0 and line in out, err[-2000:]
        else:
            assert (proc.returncode, err) == (2, f"{line} (--verbose shows the traceback)\n")
    assert not work.exists()


@pytest.mark.parametrize("model_type", ["mamba", "llava_next"])
def test_a_checkpoint_of_a_family_we_do_not_run_is_named_with_the_supported_ones(tmp_path, model_type):
    """A user error (one ``error:`` line from the CLIs), not a ValueError's traceback."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(vj.CheckpointError) as e:
        vj.load_pretrained(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: unknown model_type {model_type!r}: "
                                   "not a family vitsink_jax runs; supported: LVLM gemma3, internvl, "
                                   "llava, qwen2_5_vl; vision tower clip, clip_vision_model, ")
    assert isinstance(e.value, cli.USER_ERRORS)
