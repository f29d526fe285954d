"""train.py: loss falls, frozen parts stay bitwise, resume equals a straight run, NaN stops
with a checkpoint, 1 device = mesh(2 data x 2 fsdp x 2 tensor) = pmap(8), and a real two-process jax.distributed run."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import vitsink_jax as vj

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

SMALL = dict(image_size=56, vision_hidden=48, vision_layers=2, text_hidden=64, text_layers=2,
             vocab_size=512)


def config(**kw):
    spec = importlib.util.spec_from_file_location("diysink_config", ROOT / "configs" / "diysink.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.embedded.update(SMALL)
    cfg.data.variants, cfg.data.image_size = 1, 56
    cfg.update(dict(steps=4, batch_size=8, checkpoint_every=2, log_every=1))
    for k, v in kw.items():
        target = cfg
        *path, leaf = k.split(".")
        for p in path:
            target = target[p]
        target[leaf] = v
    return cfg


def params_of(workdir):
    return vj.load_pretrained(workdir / "export")[1]


def same(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A stage-1 DIYSink export of the small embedded model (the starting point of later stages)."""
    work = tmp_path_factory.mktemp("base")
    train.train(config(steps=2), work)
    return work


def test_loss_falls_and_only_trainable_parts_change(base, tmp_path):
    start = params_of(base)
    summary = train.train(config(stage="finetune", steps=30, checkpoint=str(base / "export"),
                                 **{"optim.lr": 3e-3}), tmp_path)
    assert summary["last_loss"] < 0.5 * summary["first_loss"], summary
    end = params_of(tmp_path)
    same(end["vision_tower"], start["vision_tower"])        # frozen: bitwise
    for part in ("language_model", "multi_modal_projector", "multi_modal_projector_sink"):
        assert not np.array_equal(end[part]["lm_head" if part == "language_model" else "linear_1"]
                                  ["kernel"], start[part]["lm_head" if part == "language_model"
                                                          else "linear_1"]["kernel"]), part
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(30))
    assert {"loss", "lr/projectors", "lr/language_model", "grad_norm", "tokens_per_s"} <= set(lines[0])
    assert lines[10]["lr/projectors"] == lines[10]["lr/language_model"] > 0  # optim.lr: every group
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_pretrain_and_rew_touch_only_their_parts(base, tmp_path):
    start = params_of(base)
    assert set(start) >= {"multi_modal_projector_sink", "multi_modal_projector"}
    train.train(config(steps=2, checkpoint=str(base / "export")), tmp_path / "pre")
    pre = params_of(tmp_path / "pre")
    same(pre["vision_tower"], start["vision_tower"])
    same(pre["language_model"], start["language_model"])
    assert not np.array_equal(pre["multi_modal_projector_sink"]["linear_2"]["kernel"],
                              start["multi_modal_projector_sink"]["linear_2"]["kernel"])
    work = tmp_path / "rew"
    train.train(config(stage="rew", steps=3, checkpoint=str(base / "export"),
                       **{"optim.lr": 1e-2, "diysink.reweight": True}), work)
    rew = params_of(work)
    assert "reweighting" in rew
    for k in start:
        same(rew[k], start[k])
    with pytest.raises(ValueError, match="rew stage needs diysink.reweight"):
        train.train(config(stage="rew", steps=1, checkpoint=str(base / "export")), tmp_path / "x")


def test_resume_equals_straight_run(base, tmp_path):
    kw = dict(stage="finetune", checkpoint=str(base / "export"), checkpoint_every=1)
    train.train(config(steps=5, **kw), tmp_path / "straight")
    train.train(config(steps=2, **kw), tmp_path / "resumed")   # "killed" after 2 steps
    summary = train.train(config(steps=5, **kw), tmp_path / "resumed")
    assert summary["resumed_from"] == 2
    same(params_of(tmp_path / "resumed"), params_of(tmp_path / "straight"))
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in straight] == [json.loads(x)["loss"] for x in resumed]
    lm_lr = [json.loads(x)["lr/language_model"] for x in straight]  # stage 2: LLaVA-1.5's 2e-5
    assert lm_lr[0] == 0 and 0 < max(lm_lr) <= 2e-5 and max(lm_lr) == pytest.approx(2e-5, rel=0.05)


def test_nan_loss_stops_with_a_checkpoint(base, tmp_path):
    with pytest.raises(FloatingPointError, match="the last good state is saved"):
        train.train(config(stage="finetune", steps=6, checkpoint=str(base / "export"),
                           **{"optim.lr": 1e30, "optim.warmup_steps": 1}), tmp_path)
    assert any((tmp_path / "checkpoints").iterdir())


def test_optimizer_lr_per_group_and_per_projector_clipping():
    """Stage defaults from the published recipes, a learning rate per param group (Adam's
    update for a constant gradient is lr x sign(g) once the warmup from 0 is over) and, in
    pretrain, each projector clipped by its own gradient norm."""
    import jax.numpy as jnp
    import optax

    from vitsink_jax import train_lib

    cfg = config().optim
    parts = ("multi_modal_projector", "multi_modal_projector_sink", "language_model")
    assert train_lib.group_lrs(cfg, "finetune", parts) == {"projectors": 2e-5, "language_model": 2e-5}
    assert train_lib.group_lrs(cfg, "pretrain", train_lib.PROJECTORS) == {"projectors": 1e-3}
    assert train_lib.group_lrs(cfg, "rew", ("reweighting",)) == {"reweighting": 1e-2}
    assert train_lib.warmup_steps(cfg, 1000) == 30                      # warmup ratio 0.03
    spec = importlib.util.spec_from_file_location("mini_config", ROOT / "configs" / "mini_study.py")
    mini = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mini)
    assert train_lib.group_lrs(mini.get_config().optim, "finetune", parts) == {  # the shipped recipe
        "projectors": 2e-3, "language_model": 2e-3}
    with pytest.raises(ValueError, match=r"optim.lrs names unknown groups \['llm'\]"):
        train_lib.group_lrs({**cfg, "lrs": {"llm": 1.0}}, "finetune", parts)

    cfg.lrs.language_model, cfg.warmup_steps = 1e-4, 1
    g = jnp.asarray([0.3, -2.0, 0.5])
    params = {p: {"w": jnp.zeros(3)} for p in parts}
    tx, schedules = train_lib.make_optimizer(cfg, 100, "finetune", parts)
    state = tx.init(params)
    for _ in range(2):  # update 0 has lr 0 (warmup from 0), update 1 the peak
        updates, state = tx.update({p: {"w": g} for p in parts}, state, params)
        params = optax.apply_updates(params, updates)
    assert set(schedules) == {"projectors", "language_model"}
    for part, lr in (("multi_modal_projector", 2e-5), ("multi_modal_projector_sink", 2e-5),
                     ("language_model", 1e-4)):
        assert float(schedules[train_lib.lr_group(part)](1)) == pytest.approx(lr)
        np.testing.assert_allclose(params[part]["w"], -lr * np.sign(g), rtol=1e-4, err_msg=part)

    grads = {"multi_modal_projector": {"w": jnp.asarray([30.0, 40.0])},        # norm 50
             "multi_modal_projector_sink": {"w": jnp.asarray([0.3, 0.4])}}     # norm 0.5
    norms = {}
    for stage in ("pretrain", "finetune"):
        clip = train_lib.clip_gradients(stage, train_lib.PROJECTORS, 1.0)
        out, _ = clip.update(grads, clip.init(grads))
        norms[stage] = {k: float(optax.global_norm(v)) for k, v in out.items()}
    assert norms["pretrain"] == pytest.approx({"multi_modal_projector": 1.0,
                                               "multi_modal_projector_sink": 0.5})
    assert norms["finetune"]["multi_modal_projector_sink"] == pytest.approx(0.5 / np.hypot(50, 0.5))


RUN = """
import json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from pathlib import Path
import jax, numpy as np
import test_train, train
cfg = test_train.config(steps=int(sys.argv[8]), stage="finetune", checkpoint={ckpt!r},
                        parallel=sys.argv[1], fsdp=int(sys.argv[2]), checkpoint_every=2,
                        tensor=int(sys.argv[9]), scan_layers=sys.argv[10] == "scan",
                        **{{"distributed.coordinator": sys.argv[3],
                        "distributed.num_processes": int(sys.argv[4]),
                        "distributed.process_id": int(sys.argv[5]),
                        "distributed.local_device_count": int(sys.argv[6]), "data.shards": 2,
                        "optim.warmup_steps": 5}})  # all inside the warmup: a run extended on
                                                     # resume has the straight run's lr
work = Path(sys.argv[7])
train.train(cfg, work)
if jax.process_index() == 0:
    losses = [json.loads(x)["loss"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    print("RESULT", jax.device_count(), json.dumps(losses))
"""


def _launch(base, work, strategy="mesh", fsdp=1, devices=1, coordinator="", nproc=1, pid=0, local=0,
            steps=3, tensor=1, layers="loop"):
    code = RUN.format(root=str(ROOT), tests=str(ROOT / "tests"), ckpt=str(base / "export"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-c", code, strategy, str(fsdp), coordinator,
                             str(nproc), str(pid), str(local), str(work), str(steps), str(tensor),
                             layers],
                            env=env,
                            cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    n, losses = line.split(" ", 2)[1:]
    return int(n), json.loads(losses)


def test_one_device_mesh_and_pmap_agree(base, tmp_path):
    """One device, fsdp x tensor over 8 devices (loop and scanned LLM layers) and pmap over 8
    train to the same losses and params."""
    runs = {}
    for name, kw in {"single": dict(), "fsdp_tensor": dict(devices=8, fsdp=2, tensor=2),
                     "fsdp_tensor_scan": dict(devices=8, fsdp=2, tensor=2, layers="scan"),
                     "pmap8": dict(devices=8, strategy="pmap")}.items():
        runs[name] = (_launch(base, tmp_path / name, **kw), kw.get("devices", 1))
    ref = None
    for name, (proc, devices) in runs.items():
        n, losses = _result(proc)
        assert n == devices
        if ref is None:
            ref, ref_params = losses, params_of(tmp_path / name)
            continue
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=name)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name),
                               params_of(tmp_path / name), ref_params)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(base, work, steps):
    """Two processes, each with a workdir of its own (``work`` for process 0, ``work``.p1)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [_launch(base, work if i == 0 else work.with_name(work.name + ".p1"),
                     coordinator=coordinator, nproc=2, pid=i, local=2, steps=steps)
             for i in range(2)]
    out = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in reversed(list(zip(procs, out))):
        assert p.returncode == 0, err[-3000:]
    line = next(x for x in out[0][0].splitlines() if x.startswith("RESULT"))
    n, losses = line.split(" ", 2)[1:]
    return int(n), json.loads(losses)


def test_two_processes_with_jax_distributed(base, tmp_path):
    """Two train.py processes joined by jax.distributed (gloo), 2 CPU devices each, each with a
    workdir of its own (no shared files) reading only its own data shard; per-process orbax
    checkpoints, then resumed together; the losses and params equal a one-process run over the
    same global batches."""
    work = tmp_path / "multi"
    n, losses = _two_processes(base, work, steps=3)
    assert n == 4
    for i in range(2):  # each process keeps its own shards in its own workdir
        own = (work if i == 0 else work.with_name(work.name + ".p1")) / f"checkpoints.process{i}"
        assert sorted(p.name for p in own.iterdir() if p.name.isdigit()) == ["2", "3"]
    _, resumed = _two_processes(base, work, steps=4)          # resumes at step 3
    _, ref = _result(_launch(base, tmp_path / "single", steps=4))
    np.testing.assert_allclose(losses + resumed[3:], ref, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           params_of(work), params_of(tmp_path / "single"))


def test_bf16_compute_and_gradient_accumulation(base, tmp_path):
    kw = dict(stage="finetune", checkpoint=str(base / "export"), steps=1)
    fp32 = train.train(config(**kw), tmp_path / "fp32")
    bf16 = train.train(config(compute_dtype="bfloat16", **kw), tmp_path / "bf16")
    np.testing.assert_allclose(bf16["first_loss"], fp32["first_loss"], rtol=3e-2)
    assert params_of(tmp_path / "bf16")["language_model"]["lm_head"]["kernel"].dtype == np.float32
    start = params_of(base)
    train.train(config(**{**kw, "optim.grad_accum": 2}), tmp_path / "acc1")  # half an update
    same(params_of(tmp_path / "acc1")["language_model"], start["language_model"])
    # inner update 1 (micro-step 2) has lr = schedule(0) = 0 (warmup from 0); update 2 moves
    train.train(config(**{**kw, "steps": 4, "optim.grad_accum": 2}), tmp_path / "acc2")
    assert not np.array_equal(params_of(tmp_path / "acc2")["language_model"]["lm_head"]["kernel"],
                              start["language_model"]["lm_head"]["kernel"])


def test_remat_and_scanned_layers_give_the_same_step(base, tmp_path):
    """remat, and scanned LLM layers with a remat policy, train to the loop's params; the
    scanned run exports HF's layout and refuses to resume in the other layout."""
    kw = dict(stage="finetune", checkpoint=str(base / "export"), steps=2)
    plain = train.train(config(**kw), tmp_path / "plain")
    remat = train.train(config(remat=True, **kw), tmp_path / "remat")
    scan = train.train(config(remat=True, scan_layers=True, remat_policy="dots_saveable", **kw),
                       tmp_path / "scan")
    assert remat["last_loss"] == pytest.approx(plain["last_loss"], rel=1e-6)
    assert scan["last_loss"] == pytest.approx(plain["last_loss"], rel=1e-5)
    for run, atol in (("remat", 1e-6), ("scan", 1e-5)):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol),
                               params_of(tmp_path / run), params_of(tmp_path / "plain"))
    with pytest.raises(SystemExit, match="scan_layers=True"):
        train.train(config(**{**kw, "steps": 3}), tmp_path / "scan")


def test_per_process_checkpoints_round_trip(tmp_path):
    """per_process storage (what several hosts without a shared filesystem use): each step a
    folder of its own, the newest N kept, every leaf (bf16 too) restored bitwise onto the same
    placement; a state of another shape is refused by name."""
    import jax.numpy as jnp

    from vitsink_jax.checkpoints import StateCheckpoints

    state = {"step": jnp.asarray(3, jnp.int32), "w": jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4),
             "opt": {"mu": jnp.linspace(0, 1, 5)}}
    ckpts = StateCheckpoints(tmp_path / "ckpt", keep=2, storage="per_process")
    for step in (1, 2, 3):
        ckpts.save(step, jax.tree_util.tree_map(lambda x, s=step: x + s, state), {"data_step": step})
    assert ckpts.latest_step() == 3 and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "3"]
    back = ckpts.restore(3, state)
    assert back["w"].dtype == jnp.bfloat16 and ckpts.meta(3) == {"data_step": 3}
    same(back, jax.tree_util.tree_map(lambda x: x + 3, state))
    with pytest.raises(SystemExit, match="holds another train state"):
        ckpts.restore(3, {**state, "extra": jnp.zeros(2)})
