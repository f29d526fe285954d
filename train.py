"""vitsink_jax trainer: one loop for every DIYSink stage.

    python train.py --config configs/diysink.py --workdir runs/diysink [--config.key=value]

A workdir that already holds a checkpoint resumes from it (params, optimizer state, step and
data position). ``steps`` counts optimizer updates and ``batch_size`` is the global batch of one
update (Hugging Face's per_device_train_batch_size x gradient_accumulation_steps x devices); with
``optim.grad_accum`` = k the step runs it as k micro-batches of batch_size / k rows (memory) and
makes one update, equal to the update on the whole batch.

A config with a ``recipe`` (e.g. configs/mini_study.py) runs several stages in a row, each in
``workdir/<run name>``, and can publish chosen exports (see :func:`run_recipe`). The trained
model is exported with vj.save_pretrained (plus the tokenizer) to ``workdir/export``:
evaluate.py loads it with ``--config.checkpoint``, transformers loads its stock part. The export
(and a recipe's published folder) is written aside and replaces the folder there whole; one
holding files this workdir did not write is refused before training starts, unless
``--config.overwrite_export=True`` (:func:`check_target`). A workdir whose run is finished
(checkpoint at step N of N, summary and export intact) is left as it is (:func:`finished`). Metrics
go to ``workdir/metrics.jsonl`` and TensorBoard files in ``workdir/tb``. The workdir, the
checkpoint and the publish folder may be ``gs://`` URIs (see :mod:`vitsink_jax.paths`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

import vitsink_jax as vj
from vitsink_jax import (atomic, cli, compile_cache, eval_settings, options, parallel, paths, preemption,
                         train_lib)
from vitsink_jax.checkpoints import StateCheckpoints
from vitsink_jax.config import DIYSinkConfig
from vitsink_jax.convert.checkpoint_io import resolve_model_path
from vitsink_jax.convert.layouts import write_fresh_llava
from vitsink_jax.data import instruct, instruct_build
from vitsink_jax.data.prefetch import Prefetch
from vitsink_jax.data.preprocess import pixels_from_bytes
from vitsink_jax.tensorboard import ScalarWriter
from vitsink_jax.data.prompts import prompt_format
from vitsink_jax.data.tokenizer import load_tokenizer
from vitsink_jax.diysink import to_diysink
from vitsink_jax.embedded import ensure_embedded_checkpoint
from vitsink_jax.progress import progress
from vitsink_jax.provenance import record, write_json
from vitsink_jax.scores import file_sha256


def base_checkpoint(cfg, workdir: Path) -> Path:
    """The checkpoint a run starts from: ``cfg.checkpoint``; or a base LLM (``cfg.llm``) and a
    vision tower (``cfg.vision_tower``) with a new projector, as the authors' trainers start
    (:func:`vitsink_jax.convert.layouts.write_fresh_llava`, in ``workdir/base`` on a local
    disk); or the embedded default (written into ``workdir`` once). A ``gs://`` checkpoint is
    copied to a local cache."""
    if cfg.get("llm") or cfg.get("vision_tower"):
        if cfg.checkpoint or not (cfg.llm and cfg.vision_tower):
            raise SystemExit("error: --config.llm and --config.vision_tower go together, instead of "
                             "--config.checkpoint (a base LLM and a vision tower with a new projector)")
        return write_fresh_llava(resolve_model_path(cfg.llm), resolve_model_path(cfg.vision_tower),
                                 parallel.process_local(paths.local_workdir(workdir) / "base"), cfg.seed)
    return paths.on_disk(cfg.checkpoint) if cfg.checkpoint else ensure_embedded_checkpoint(
        workdir, cfg.embedded, cfg.seed)


def load_model(cfg, ckpt: Path, mesh=None):
    """(model in the compute dtype, params, tokenizer) of checkpoint ``ckpt``. The params are
    created on their ``mesh`` shards while reading (none without a mesh: pmap), the parts that
    train in ``cfg.stage`` in float32 and the frozen ones in the compute dtype; with
    ``cfg.scan_layers`` in the scanned layout (the export is HF's either way)."""
    trains = train_lib.trainable_parts(cfg.stage, cfg.finetune_parts)
    compute = jnp.dtype(cfg.compute_dtype)
    group_dtype = lambda name: jnp.float32 if name in trains else compute  # noqa: E731
    model, params = vj.load_pretrained(ckpt, dtype=compute, param_dtype=jnp.float32, mesh=mesh,
                                       param_dtypes=lambda path: group_dtype(path[0]),
                                       remat=cfg.remat, remat_policy=cfg.remat_policy,
                                       scan_layers=cfg.scan_layers, attention_impl=cfg.attention_impl)
    if not isinstance(model, vj.LlavaForConditionalGeneration):
        raise SystemExit(f"error: {ckpt} is a {type(model).__name__}; training needs a llava checkpoint")
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise SystemExit(f"error: {ckpt} has no tokenizer files; training needs the tokenizer")
    d, have = cfg.diysink, model.config.diysink
    if d.enabled and (have is None or (d.reweight and not have.reweight)):
        want = (DIYSinkConfig(vj.SinkRule(**d.rule), d.select, d.reweight, d.rew_hidden,
                              d.question_encoder)
                if have is None else dataclasses.replace(have, reweight=True, rew_hidden=d.rew_hidden,
                                                         question_encoder=d.question_encoder))
        model, grown = to_diysink(model, params, want, d.init, jax.random.PRNGKey(cfg.seed))
        new = {k: jax.tree_util.tree_map(lambda x, k=k: x.astype(group_dtype(k)), v)
               for k, v in grown.items() if k not in params}  # small: the projector / ReW MLP
        if mesh is not None:
            new = jax.device_put(new, parallel.param_shardings(new, mesh))
        params = {**params, **new}
    return model, params, tokenizer


def token_spec(cfg, model, tokenizer) -> instruct_build.TokenSpec:
    """How training rows are tokenized: the model's prompt format, ``data.system``, the length
    limit (``data.max_length``, 0: the LLM's positions) with ``data.too_long``, the template
    (``data.template``: "chat", "plain", or "auto": LLaVA's plain format in the pretrain stage,
    as LLaVA-1.5 and TinyLLaVA pre-train, the chat markup otherwise) and ``data.image_first``."""
    d = cfg.data
    limit = d.max_length or model.config.text.max_position_embeddings
    template = d.template if d.template != "auto" else (
        "plain" if cfg.stage == "pretrain" else "chat")
    fmt = prompt_format(model.config, tokenizer)
    image = len(fmt.image.ids(1))
    if limit <= image:  # a cut inside the image's tokens would leave the row unusable
        raise SystemExit(f"error: --config.data.max_length={limit} leaves no room after the image's "
                         f"{image} tokens")
    return instruct_build.TokenSpec(tokenizer, fmt, d.get("system", ""), limit, d.too_long,
                                    template, d.image_first)


def load_data(cfg, workdir: Path, spec: instruct_build.TokenSpec, json_sha256: str | None = None):
    """The instruction rows by index with their token lengths (``instruct_build.InstructData``:
    read on access), built once per source and tokenization (:mod:`vitsink_jax.data.instruct_build`:
    streamed, by ``data.build_workers`` processes, resumable). With several processes: when
    ``data.shared_fs`` says the data_dir is seen by every host, process 0 builds and the others
    read its build; otherwise every process builds its own copy of all rows in a folder of its
    own (hosts share no filesystem), so any host can read any row of a global batch.
    ``json_sha256``: the JSON file's hash when the caller has it already (:func:`run_settings`)."""
    d = cfg.data
    data_dir = paths.data_dir(d.data_dir, workdir, "data.data_dir")
    shared = jax.process_count() > 1 and d.shared_fs
    if not shared:
        data_dir = parallel.process_local(data_dir)
    name = Path(d.json).stem if d.json else "embedded"
    source = ({"json_sha256": json_sha256 or file_sha256(d.json), "image_folder": str(d.image_folder)}
              if d.json else {"embedded": [cfg.seed + 1000, d.variants, d.image_size, d.mc_format]})
    folder = instruct_build.instruct_folder(data_dir, name, source, spec)
    if jax.process_count() > 1 and jax.process_index() == 0:
        print(f"data: process 0 builds {folder} for every host (data.shared_fs)" if shared else
              "data: every process builds its own copy of the rows (data.shared_fs=False)")
    builds = not shared or jax.process_index() == 0
    if builds and not instruct_build.built(folder, source):
        verbose = jax.process_index() == 0 or not shared
        if d.json:
            instruct_build.build_json(d.json, d.image_folder or None, folder, source, spec,
                                      d.build_workers, d.shard_rows, verbose)
        else:
            records = instruct.embedded_instruct(cfg.seed + 1000, d.variants, d.image_size, d.mc_format)
            instruct_build.build_records(records, folder, source, spec, verbose=False)
    if shared:  # the others wait for the build by polling the shared folder, not in a collective
        while not instruct_build.built(folder, source):
            time.sleep(10)
        parallel.sync("instruction data built")
    data = instruct_build.InstructData(folder)
    if not shared:  # every copy must hold the same rows: the batches index them alike
        digests = parallel.allgather_objects(data.digest)
        if len(set(digests)) > 1:
            raise SystemExit(f"error: the hosts built different instruction data (rows / lengths "
                             f"digests {digests}): some host reads other files; see each host's "
                             f"{folder}/manifest.json for its skipped rows")
    return data


class Batches:
    """This process's rows of global batch k. Global batch k is the records
    ``instruct.batch_indices`` picks for k out of all of them, a function of (seed, k) alone,
    so a run resumed on another number of hosts continues with the same rows; process p
    supplies its contiguous slice of it (``parallel.process_rows``), padded to the longest row
    of the whole global batch (read from the build's manifest: no process tokenizes another's
    rows), so every process passes arrays of one shape (and as a one-process run would). A row
    longer than the limit (``data.too_long=truncate``) keeps its first ``max_length`` tokens, as
    LLaVA truncates to ``model_max_length``. A text-only row gets blank pixels and
    ``has_image`` False. Safe to call from several threads at once
    (``vitsink_jax.data.prefetch``); the tokenizer serves one at a time (a Rust-backed fast
    tokenizer may refuse concurrent calls: "Already borrowed")."""

    def __init__(self, records, model, tokenizer, cfg, process_index=None, process_count=None,
                 spec=None):
        self.records, self.model, self.tok, self.cfg = records, model, tokenizer, cfg
        self.spec = spec or token_spec(cfg, model, tokenizer)
        if cfg.batch_size > len(records):
            raise SystemExit(f"error: batch_size {cfg.batch_size} is larger than the "
                             f"{len(records)} training records")
        self.rows = parallel.process_rows(cfg.batch_size, process_index, process_count)
        self.tokenizing = threading.Lock()
        self.blank = None  # pixels of a text-only row (zeros, as LLaVA's), made once
        aspect = getattr(getattr(cfg, "data", None), "image_aspect_ratio", "auto")
        self.aspect = None if aspect == "auto" else aspect  # None: the checkpoint's own

    def example(self, record) -> dict:
        """A record tokenized (ids, loss_mask, question_mask), cut to the length limit."""
        with self.tokenizing:
            ids, loss_mask, question_mask = self.spec.tokenize(record["roles"], record["texts"])
        keep = slice(0, self.spec.max_length or None)
        return {"ids": ids[keep], "loss_mask": loss_mask[keep], "question_mask": question_mask[keep]}

    def pixels(self, record) -> np.ndarray:
        if record["image"]:
            return pixels_from_bytes(self.model.config, record["image"], self.aspect)
        if self.blank is None:
            self.blank = np.zeros_like(pixels_from_bytes(self.model.config, blank_png()))
        return self.blank

    def indices(self, step: int) -> np.ndarray:
        """Record indices of global batch ``step`` (every process's rows, in order)."""
        # [seed, 0]: the stream of the single data shard of earlier versions, so one-process
        # runs keep their batches except where a batch straddling two epochs repeated a row
        # (the mini study's 600-step stages are unchanged; its ReW stage differs from step 86)
        return instruct.batch_indices(len(self.records), self.cfg.batch_size, step,
                                      [self.cfg.seed, 0])

    def __call__(self, step: int) -> dict:
        every = self.indices(step)
        rows = []
        for i in every[self.rows]:
            record = self.records[i]
            rows.append({**self.example(record), "pixels": self.pixels(record),
                         "has_image": bool(record["image"])})
        return instruct.pad_batch(rows, self.cfg.length_bucket, self.tok.pad_token_id or 0,
                                  longest=int(self.records.lengths[every].max()))


def blank_png() -> bytes:
    """A 1 x 1 PNG (its preprocessed shape is the model's pixel shape)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    return buf.getvalue()


class Runner:
    """The step function and state placement of one parallel strategy."""

    def __init__(self, cfg, model, tx, schedules, frozen, mesh=None):
        self.strategy = cfg.parallel
        o = cfg.optim
        averaging = dict(grad_accum=o.grad_accum, loss_average=o.loss_average,
                         group_rows=o.loss_group_rows or cfg.batch_size // (jax.device_count() * o.grad_accum))
        if self.strategy == "pmap":
            step = train_lib.make_train_step(model, tx, schedules, cfg.stage, axis_name="batch",
                                             **averaging)
            self.step = jax.pmap(step, axis_name="batch", in_axes=(0, None, 0), donate_argnums=(0,))
            self.frozen = frozen
        else:
            self.mesh = mesh
            self.frozen = frozen  # already on its shards (load_model)
            self._step = train_lib.make_train_step(model, tx, schedules, cfg.stage, mesh=mesh,
                                                   **averaging)
            self.step = None

    def place(self, state):
        if self.strategy == "pmap":
            return parallel.stack_for_pmap(state)
        shardings = parallel.param_shardings(state, self.mesh)
        self.step = jax.jit(self._step, out_shardings=(shardings, None), donate_argnums=(0,))
        return jax.device_put(state, shardings)

    def run(self, state, local_batch):
        if self.strategy == "pmap":
            state, metrics = self.step(state, self.frozen, parallel.split_for_pmap(local_batch))
            return state, jax.tree_util.tree_map(lambda x: x[0], metrics)
        return self.step(state, self.frozen, parallel.global_batch(local_batch, self.mesh))

    @staticmethod
    def host_metrics(metrics: dict) -> dict:
        """A step's metrics as Python floats, read in one transfer (waits for the step)."""
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def unplace(self, state):
        """The state as one copy (pmap keeps one per device)."""
        return jax.tree_util.tree_map(lambda x: x[0], state) if self.strategy == "pmap" else state


# the settings that define a run (config keys): a resume with any of them changed is refused
# (``resume_changes=allow`` overrides). Learning rates, steps, logging, checkpointing, padding,
# remat, grad_accum and the parallel layout may change (a lower lr after a non-finite loss).
# The base checkpoint and data file count by content (sha256), not path: a copy elsewhere is
# the same run.
RUN_KEYS = ("seed", "stage", "finetune_parts", "batch_size", "compute_dtype", "scan_layers",
            "optim.loss_average", "optim.loss_group_rows",
            "diysink", "data.image_folder", "embedded", "data.variants", "data.image_size",
            "data.mc_format", "data.system", "data.template", "data.image_first", "data.max_length",
            "data.too_long", "data.image_aspect_ratio")
# settings stored only when not at these defaults (the checkpoints written before them resume)
RUN_DEFAULTS = {"data.system": "", "data.template": "chat", "data.image_first": True,
                 "data.max_length": 0, "data.too_long": "skip", "data.image_aspect_ratio": "auto",
                 "optim.loss_average": "tokens", "optim.loss_group_rows": 0}


def run_settings(cfg, ckpt: Path) -> dict:
    """{dotted config key: value} of :data:`RUN_KEYS` that apply to this run (the embedded
    model's shape only without ``checkpoint``, the embedded data's only without ``data.json``,
    DIYSink's only when enabled, the trained parts only for the finetune stage), plus
    ``sha256:checkpoint`` (the base checkpoint's files), ``sha256:vision_tower`` (the tower of a
    base LLM + tower start) and ``sha256:data.json`` (the instruction file's bytes): the config
    as stored in a checkpoint."""
    flat = {}
    for key in RUN_KEYS:
        top, _, sub = key.partition(".")
        value = cfg[top][sub] if sub else cfg[key]
        if hasattr(value, "to_dict"):
            flat.update({f"{key}.{k}": v for k, v in options.flatten(value).items()})
        else:
            flat[key] = value
    skip = (("embedded.",) if cfg.checkpoint else ()) + (
        ("data.variants", "data.image_size", "data.mc_format") if cfg.data.json else ("data.image_folder",))
    if not cfg.diysink.enabled:
        skip += tuple(k for k in flat if k.startswith("diysink.") and k != "diysink.enabled")
    if cfg.stage != "finetune":  # the other stages train fixed parts
        skip += ("finetune_parts",)
    skip += tuple(k for k, v in RUN_DEFAULTS.items()
                  if cfg[k.partition(".")[0]].get(k.partition(".")[2], v) == v)
    flat = {k: v for k, v in flat.items() if not k.startswith(skip)}
    flat["sha256:checkpoint"] = vj.checkpoint_hash(ckpt)
    if cfg.get("vision_tower"):  # a fresh LLaVA's base folder names its tower by path only
        flat["sha256:vision_tower"] = vj.checkpoint_hash(resolve_model_path(cfg.vision_tower))
    if cfg.data.json:
        flat["sha256:data.json"] = file_sha256(cfg.data.json)
    return json.loads(json.dumps(flat))  # tuples as lists, as read back from a checkpoint


def setting_changes(saved: dict, now: dict) -> list:
    """One line per setting that differs between a checkpoint's ``saved`` settings and ``now``,
    naming the flag that sets it."""
    lines = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key, "(unset)"), now.get(key, "(unset)")
        if old == new:
            continue
        if key.startswith("sha256:"):
            lines.append(f"--config.{key.partition(':')[2]}: other contents (sha256 "
                         f"{str(old)[:12]} in the checkpoint, {str(new)[:12]} now)")
        else:
            lines.append(f"--config.{key}: {old!r} in the checkpoint, {new!r} now")
    return lines


def check_resume(manager, step: int, cfg, settings: dict) -> list:
    """The setting changes of resuming checkpoint ``step`` with ``settings``; refuses (SystemExit,
    a line per change) unless ``cfg.resume_changes == "allow"``, and always refuses a change of
    param layout or, with per-process storage, of devices (neither can be restored)."""
    meta = manager.meta(step)
    where = f"{manager.directory} (step {step})"
    saved = meta.get("scan_layers", False)
    if saved != cfg.scan_layers:
        raise SystemExit(f"error: the checkpoint in {where} was saved with "
                         f"scan_layers={saved}; resume it with --config.scan_layers={saved}")
    here = devices_meta(cfg)
    if manager.storage == "per_process" and meta.get("devices", here) != here:
        raise SystemExit(f"error: the checkpoint in {where} holds this process's shards "
                         f"for {meta['devices']}; this run has {here} (per-process checkpoints "
                         "resume on the same devices)")
    if "settings" not in meta:
        changes = ["the checkpoint records no run settings (written by an older vitsink_jax)"]
    else:
        changes = setting_changes(meta["settings"], settings)
    if changes and cfg.resume_changes != "allow":
        raise SystemExit(f"error: {where} was saved by a run with other settings:\n  "
                         + "\n  ".join(changes) + "\nundo the change, use a new --workdir, or "
                         "resume anyway with --config.resume_changes=allow (recorded in "
                         "train_summary.json)")
    return changes


def restore_checkpoint(manager, state, cfg, settings: dict):
    """(state, meta, setting changes) of the newest checkpoint with finite params and optimizer
    state, restored into the layout of ``state``; checks the saved settings first
    (:func:`check_resume`). A checkpoint holding a non-finite value is set aside."""
    while (step := manager.latest_step()) is not None:
        changes = check_resume(manager, step, cfg, settings)
        try:
            restored = manager.restore(step, state)
        except (ValueError, KeyError, TypeError) as e:  # another tree, shape or dtype
            raise SystemExit(f"error: {manager.directory} (step {step}) holds another train state "
                             f"than this run builds ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                             "use a new --workdir") from None
        if bool(train_lib.all_finite(restored)):
            return restored, manager.meta(step), changes
        aside = manager.set_aside(step)
        print(f"checkpoint step {step} holds non-finite values: set aside as {aside.name}")
    raise SystemExit(f"error: every checkpoint in {manager.directory} holds non-finite values "
                     "(set aside as <step>.nonfinite); start again in a new --workdir")


def nonfinite_error(manager, first: int, step: int, metrics: dict, cfg, bad_state: bool,
                    save_state) -> FloatingPointError:
    """The error of a run stopped at ``step``, whose steps since data step ``first`` were not
    applied (the state is still the one step ``first`` was given). ``bad_state`` (a loss was not
    finite): that state is suspect, so the checkpoints from ``first`` on, which hold it, are set
    aside and the message names the newest one before. Otherwise only an update was not finite:
    the state is the good one before it, saved by ``save_state()`` as checkpoint ``first`` when
    none is there yet."""
    if bad_state:
        aside = [manager.set_aside(s).name for s in manager.steps() if s >= first]
        good = [s for s in manager.steps() if s < first]
        what = "loss not finite"
        fix = (f"checkpoints {', '.join(aside)} set aside; " if aside else "") + (
            f"resume from step {good[-1]} (the newest checkpoint before it, in {manager.directory})"
            if good else "no checkpoint precedes it: run again from step 0")
    else:
        if first not in manager.steps():
            save_state()
        what = f"update not finite (the loss {metrics['loss']:.4g} was)"
        fix = f"the state before it is checkpoint {first}: resume from step {first}"
    return FloatingPointError(
        f"{what} at step {step} (loss {metrics['loss']}, stage {cfg.stage}, {lr_text(metrics)}"
        + (f"; {step - first} step{'s' * (step - first > 1)} before it skipped" if step > first else "")
        + "); "
        + fix + " with a lower learning rate (--config.optim.lr, --config.optim.lrs.<group>), or "
        "with --config.nonfinite=skip if the batch is bad")


def lr_text(metrics: dict) -> str:
    """The learning rate of each group in a step's metrics, e.g. "lr/projectors 0.001"."""
    return ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if k.startswith("lr/"))


def devices_meta(cfg) -> dict:
    """The device layout a per-process checkpoint's shards belong to (dcn_data only when above 1,
    so checkpoints of one slice, older ones included, compare as before)."""
    return {"processes": jax.process_count(), "devices": jax.device_count(),
            "parallel": cfg.parallel, "fsdp": cfg.fsdp, "tensor": cfg.tensor,
            **({"dcn_data": cfg.dcn_data} if cfg.dcn_data > 1 else {})}


class MetricLog:
    """metrics.jsonl (appended, one line per logged step, with the wall-clock ``time`` it was
    written) and TensorBoard scalars (process 0)."""

    def __init__(self, workdir: Path):
        self.active = jax.process_index() == 0
        if self.active:
            self.file = paths.append(workdir / "metrics.jsonl", "a")
            self.tb = ScalarWriter(workdir / "tb")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps({"step": step, **metrics, "time": time.time()}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            if v is not None:
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.file.close()
            self.tb.close()


def owner(workdir) -> str:
    """Who a workdir's export and published folders belong to (their stamp's owner,
    :mod:`vitsink_jax.atomic`): the workdir, absolute."""
    return str(workdir) if paths.is_remote(workdir) else str(Path(workdir).absolute())


def on_writer(decide):
    """``decide()`` as process 0 finds it, in every process (the export and the published
    folder are on process 0's disk; hosts need not share one)."""
    return parallel.allgather_objects(decide() if jax.process_index() == 0 else None)[0]


def check_target(cfg, folder, workdir, what: str) -> None:
    """Refuses (SystemExit naming ``folder`` and a file in it) to write ``what`` into ``folder``
    when it holds files this workdir's runs did not write there, unless
    ``cfg.overwrite_export`` says to replace it. Called before any training."""
    if cfg.overwrite_export:
        return
    foreign = on_writer(lambda: atomic.stranger(folder, owner(workdir)))
    if foreign:
        raise SystemExit(f"error: {folder} holds files this workdir did not write ({foreign}); the "
                         f"{what} would replace that folder whole: move them away, use another "
                         "--workdir, or replace it with --config.overwrite_export=True")


def write_export(cfg, workdir, model, params, tokenizer):
    """Writes the trained model (vj.save_pretrained, float32, streamed from the shards: a
    collective for global arrays) and the tokenizer into ``workdir/export``, stamped as this
    workdir's: prepared aside (:func:`vitsink_jax.atomic.staging`) by process 0 and put in
    place of the folder there whole. The export records the images it trained on
    (``data.image_aspect_ratio``) and the evaluation settings it trained with
    (:mod:`vitsink_jax.eval_settings`: multiple-choice format, system prompt, DIYSink's rule)."""
    export = workdir / "export"
    aspect = cfg.data.image_aspect_ratio
    if aspect != "auto" and hasattr(model.config, "image_aspect_ratio"):
        model = model.clone(config=dataclasses.replace(model.config, image_aspect_ratio=aspect))
    staged, writer = atomic.staging(export), jax.process_index() == 0
    if writer:
        shutil.rmtree(staged, ignore_errors=True)  # an interrupted run's
    try:
        if parallel.is_global(params) or writer:  # a collective for global arrays
            vj.save_pretrained(model, params, staged, dtype=jnp.float32)
        if writer:
            tokenizer.save_pretrained(str(staged))
            # the settings it was trained with, which evaluation applies (vitsink_eval.json)
            (staged / eval_settings.FILE).write_text(
                json.dumps(eval_settings.from_training(cfg), indent=2, sort_keys=True) + "\n")
            atomic.stamp(staged, owner(workdir), stage=cfg.stage, steps=cfg.steps)
            atomic.replace_folder(staged, export)
    finally:
        if writer:
            shutil.rmtree(staged, ignore_errors=True)
    return export


def finished(cfg, workdir, manager) -> dict | None:
    """The summary of this run when it has nothing left to do (its newest checkpoint is at step
    ``cfg.steps``, train_summary.json and an intact export of this workdir are there), else
    None."""
    if manager.latest_step() != cfg.steps:  # (every process: a collective for per-process ones)
        return None

    def check():
        summary = workdir / "train_summary.json"
        if not summary.is_file() or not atomic.intact(workdir / "export", owner(workdir)):
            return None
        return json.loads(summary.read_text())
    return on_writer(check)


def train(cfg, workdir: Path) -> dict:
    """Runs (or resumes) one stage; returns the summary also written to train_summary.json. A
    finished run (:func:`finished`) changes nothing and returns its summary."""
    options.check_config(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    parallel.init_distributed(cfg.distributed)
    check_target(cfg, workdir / "export", workdir, "export")
    accum = cfg.optim.grad_accum
    if accum < 1 or cfg.batch_size % (jax.device_count() * accum):
        raise SystemExit(f"error: batch_size {cfg.batch_size} is not a multiple of the "
                         f"{jax.device_count()} devices x optim.grad_accum {accum} (each "
                         "device's rows split into grad_accum micro-batches)")
    rows = cfg.batch_size // jax.device_count()
    if (cfg.parallel == "pmap" and cfg.optim.loss_average == "per_device_batch"
            and rows % (cfg.optim.loss_group_rows or rows // accum)):
        raise SystemExit(f"error: --config.optim.loss_group_rows={cfg.optim.loss_group_rows} does not "
                         f"divide the {rows} rows of a device: pmap forms the loss groups in each "
                         "device's rows (the mesh forms them in the whole batch)")
    mesh = (parallel.make_mesh(cfg.fsdp, tensor=cfg.tensor, dcn_data=cfg.dcn_data)
            if cfg.parallel == "mesh" else None)
    ckpt = base_checkpoint(cfg, workdir)
    settings = run_settings(cfg, ckpt)
    manager = StateCheckpoints(workdir / "checkpoints", cfg.keep_checkpoints, cfg.checkpoint_storage)
    if manager.latest_step() is not None:  # refuse a changed run before loading anything
        check_resume(manager, manager.latest_step(), cfg, settings)
        done = finished(cfg, workdir, manager)
        if done is not None:
            print(f"already at step {cfg.steps} of {cfg.steps}; nothing to do (export in "
                  f"{workdir / 'export'})")
            return done
    model, params, tokenizer = load_model(cfg, ckpt, mesh)
    trainable, frozen = train_lib.split_params(params, train_lib.trainable_parts(
        cfg.stage, cfg.finetune_parts))
    tx, schedules = train_lib.make_optimizer(cfg.optim, cfg.steps, cfg.stage, tuple(trainable))
    state = {"step": jnp.asarray(0, jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
    runner = Runner(cfg, model, tx, schedules, frozen, mesh)
    state = runner.place(state)
    start, changes, skipped, saved = 0, [], [], {}
    if manager.latest_step() is not None:
        one, saved, changes = restore_checkpoint(manager, runner.unplace(state), cfg, settings)
        state, start = runner.place(one), int(saved["data_step"])
        print(f"resumed from {manager.directory} at step {start}"
              + (f" with changed settings: {'; '.join(changes)}" if changes else ""))
        # the run's history so far (every earlier session's) carries on in the checkpoints
        changes = saved.get("resume_changes", []) + changes
        skipped = [s for s in saved.get("skipped_steps", []) if s < start]
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    print(f"stage {cfg.stage}: training {n_train / 1e6:.2f}M params "
          f"({', '.join(sorted(trainable))}), {cfg.steps} steps of {cfg.batch_size} rows"
          + (f" ({accum} micro-batches of {cfg.batch_size // accum})" if accum > 1 else "") + ", "
          f"parallel={cfg.parallel} on {jax.device_count()} device(s), "
          f"{jax.process_count()} process(es); peak lr "
          + ", ".join(f"{g} {lr:g}" for g, lr in train_lib.group_lrs(cfg.optim, cfg.stage, trainable).items())
          + f", warmup {train_lib.warmup_steps(cfg.optim, cfg.steps)} steps")
    spec = token_spec(cfg, model, tokenizer)
    batches = Batches(load_data(cfg, workdir, spec, settings.get("sha256:data.json")), model,
                      tokenizer, cfg, spec=spec)
    digest = batches.records.digest
    if saved.get("data_digest", digest) != digest:  # the build kept other rows: another stream
        change = (f"the instruction data's kept rows / lengths (digest {saved['data_digest']} in the "
                  f"checkpoint, {digest} now)")
        if cfg.resume_changes != "allow":
            raise SystemExit(f"error: {manager.directory} was trained on other rows: {change}; use the "
                             "data it was built from, or --config.resume_changes=allow")
        changes.append(change)
    log = MetricLog(workdir)
    meta = {"base_checkpoint": str(ckpt), "base_sha256": settings["sha256:checkpoint"],
            "stage": cfg.stage, "scan_layers": cfg.scan_layers, "devices": devices_meta(cfg),
            "settings": settings, "resume_changes": changes, "data_digest": digest}
    losses, first_bad, due = [], None, False
    bar = progress(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.stage}",
                   disable=jax.process_index() != 0)
    # the batches of the next steps are computed in threads while a step runs (the same batches
    # in the same order); leaving the loop, by an exception too, stops them. A SIGTERM stops the
    # run after the step it arrives in, saved (vitsink_jax.preemption)
    with Prefetch(batches, range(start, cfg.steps), cfg.data.prefetch, cfg.data.workers) as feed, \
            preemption.StopRequest() as stop:
        for step in bar:
            t0 = time.perf_counter()
            batch = feed.get(step)  # computed while the steps before it ran
            state, metrics = runner.run(state, batch)
            metrics = runner.host_metrics(metrics)
            if metrics.pop("applied"):
                first_bad = None
            else:  # the step kept the state it was given
                if first_bad is None:
                    first_bad, bad_state = step, False
                bad_state |= not math.isfinite(metrics["loss"])
                if cfg.nonfinite == "stop" or step - first_bad >= cfg.max_skips:
                    log.close()
                    raise nonfinite_error(
                        manager, first_bad, step, metrics, cfg, bad_state, lambda: manager.save(
                            first_bad, runner.unplace(state), {**meta, "data_step": first_bad,
                                                               "skipped_steps": skipped}))
                skipped.append(step)
                log.write(step, {"skipped": 1, "loss": None})
            if first_bad is None:
                metrics["tokens_per_s"] = float(batch["mask"].sum()) * jax.process_count() / (
                    time.perf_counter() - t0)
                metrics["data_wait_s"] = feed.waited  # of this step's batch
                losses.append(metrics["loss"])
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    log.write(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            # a checkpoint falling due in a run of skipped steps waits for the next applied one:
            # it would hold the state that gave them and push a good one out of keep_checkpoints
            due = due or (step + 1) % cfg.checkpoint_every == 0
            stopping = stop.due(step + 1) and step < cfg.steps - 1  # the last step ends anyway
            if (due and first_bad is None) or step == cfg.steps - 1 or stopping:
                due = False
                manager.save(step + 1, runner.unplace(state), {**meta, "data_step": step + 1,
                                                               "skipped_steps": skipped})
            if stopping:
                log.close()
                raise stop.stop(step + 1, cfg.steps, manager.directory)
    log.close()
    final = {**frozen, **runner.unplace(state)["trainable"]}
    export = write_export(cfg, workdir, model, final, tokenizer)
    losses = losses or loss_curve(workdir)  # no step left (a re-export): the run's logged ones
    summary = {**record(cfg, cfg.seed, str(ckpt), meta["base_sha256"]), "stage": cfg.stage,
               "steps": cfg.steps, "resumed_from": start, "resume_changes": changes,
               "skipped_steps": skipped, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "export": str(export),
               "data_wait_share": feed.wait_share()}
    if jax.process_index() == 0:
        write_json(workdir / "train_summary.json", summary)
        print(f"losses: first {_loss(summary['first_loss'])}, last {_loss(summary['last_loss'])}; "
              + (f"{len(skipped)} non-finite steps skipped; " if skipped else "")
              + f"exported to {export}")
    return summary


def _loss(x) -> str:
    """A loss as printed: 4 significant digits (float32 noise such as 11.5600004196167 cut)."""
    return "-" if x is None else f"{x:.4g}"


def parse_run(spec: str, workdir: Path) -> tuple[str, dict]:
    """One recipe line ``"name: key=value key=value ..."`` -> (name, {dotted key: value}); values
    are Python literals where they parse as one (``1e-2``, ``True``, ``("a", "b")``), else
    strings; ``{workdir}`` in a value is the recipe's workdir."""
    import ast
    import shlex

    name, sep, rest = spec.partition(":")
    if not sep or not name.strip().isidentifier():
        raise SystemExit(f"error: recipe run {spec!r} is not 'name: key=value ...'")
    overrides = {}
    for item in shlex.split(rest):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"error: recipe run {name.strip()!r}: {item!r} is not key=value")
        value = value.replace("{workdir}", str(workdir))
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return name.strip(), overrides


def loss_curve(run_dir: Path) -> list:
    """The loss of every logged step of a run (from metrics.jsonl; a resumed step's last entry)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():  # only process 0 writes metrics
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        by_step[entry["step"]] = entry["loss"]
    return [by_step[k] for k in sorted(by_step)]


def recipe_config(cfg, name: str, overrides: dict):
    """The config of recipe run ``name``: ``cfg`` without its recipe keys, ``overrides``
    applied, every value checked (:func:`vitsink_jax.options.check_config`), so that a bad
    override of a later run stops the recipe before its first run starts."""
    run_cfg = cfg.copy_and_resolve_references()
    with run_cfg.unlocked():
        del run_cfg["recipe"], run_cfg["publish"], run_cfg["publish_dir"]
    try:
        run_cfg.update_from_flattened_dict(overrides)
    except (KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: recipe run {name!r}: bad override ({e})")
    try:
        options.check_config(run_cfg)
    except options.ConfigError as e:
        raise options.ConfigError(f"recipe run {name!r}: {e}") from e
    return run_cfg


def run_recipe(cfg, workdir: Path) -> dict:
    """Runs the stages of ``cfg.recipe`` in order (each: the config plus its overrides, in
    ``workdir/<name>``; a finished run changes nothing: :func:`finished`), then copies the
    exports named in ``cfg.publish`` ({published name: run name}) to ``cfg.publish_dir``
    (default ``workdir/published``, replaced whole: :func:`vitsink_jax.mini_study.publish`) with
    one training record: the recipe, every run's summary (config, seed, versions, hashes) and
    loss curve; unless it holds what this workdir published from these very exports already.
    A publish folder holding files this workdir did not write there is refused before any
    training (:func:`check_target`)."""
    from vitsink_jax import mini_study

    runs = [parse_run(spec, workdir) for spec in cfg.recipe]
    unknown = sorted(set(cfg.publish.values()) - {name for name, _ in runs})
    if unknown:
        raise SystemExit(f"error: publish names runs {unknown} that are not in the recipe")
    configs = {name: recipe_config(cfg, name, overrides) for name, overrides in runs}
    out = paths.path(cfg.publish_dir or workdir / "published")
    if cfg.publish:
        check_target(cfg, out, workdir, "publish step")
    summaries = {}
    for name, overrides in runs:
        print(f"== recipe run {name}: " + " ".join(f"{k}={v}" for k, v in overrides.items()))
        summaries[name] = {**train(configs[name], workdir / name), "loss_curve": loss_curve(workdir / name)}
    if cfg.publish:
        exports = {k: workdir / run / "export" for k, run in cfg.publish.items()}
        if on_writer(lambda: mini_study.is_published(exports, out, owner(workdir))):
            print(f"published {', '.join(cfg.publish)} in {out} already (from these exports); nothing to do")
        elif jax.process_index() == 0:
            mini_study.publish(exports, {"command": " ".join(["python"] + sys.argv),
                                         "recipe": list(cfg.recipe), "runs": summaries},
                               out, owner(workdir))
            print(f"published {', '.join(cfg.publish)} to {out}")
    return summaries


def main(argv):
    del argv
    train_lib.keep_host_memory()  # first: before JAX starts a thread (see its doc)
    compile_cache.enable(flags.FLAGS.config.compile_cache)
    cfg, workdir = flags.FLAGS.config, paths.path(flags.FLAGS.workdir)
    if cfg.get("recipe"):
        run_recipe(cfg, workdir)
    else:
        train(cfg, workdir)


DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "diysink.py")  # from any directory


def define_flags() -> None:
    """The CLI flags, defined only when run as a script (importing the module, as the tests do,
    defines none, so train.py and evaluate.py can share a process)."""
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Python config file.")
    flags.DEFINE_string("workdir", "runs/diysink", "Checkpoints, metrics and the export.")
    cli.define_verbose()


if __name__ == "__main__":
    cli.run_script(main, define_flags, DEFAULT_CONFIG, options.check_config)
