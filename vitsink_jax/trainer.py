"""One training stage, in named steps: the run checked and set up (:func:`setup`), the model
loaded with the parts that train in float32 (:func:`load_model`), the state placed by the
parallel strategy (:class:`Runner`) and resumed from the newest finite checkpoint
(:func:`~vitsink_jax.train_resume.resume`), the steps run with their batches computed ahead
(:class:`~vitsink_jax.train_loop.StageLoop`: metrics, skipped non-finite steps, checkpoints,
preemption), then the export and the summary (:func:`finish`). train.py is the CLI around
:func:`train`.

A workdir that already holds a checkpoint resumes from it (params, optimizer state, step and
data position); one whose run is finished is left as it is
(:func:`~vitsink_jax.train_export.finished`).
Metrics go to ``workdir/metrics.jsonl`` and TensorBoard files in ``workdir/tb``
(:class:`~vitsink_jax.train_loop.MetricLog`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from . import options, parallel, paths, train_lib
from .checkpoints import StateCheckpoints
from .config import DIYSinkConfig
from .convert.folders import resolve_model_path
from .convert.layouts import write_fresh_llava
from .convert.reading import load_pretrained
from .data.tokenizer import load_tokenizer
from .diysink import to_diysink
from .embedded import ensure_embedded_checkpoint
from .models.lvlm import LlavaForConditionalGeneration
from .provenance import record, write_json
from .sinks.detect import SinkRule
from .train_data import Batches, load_data, token_spec
from .train_export import check_target, finished, write_export
from .train_loop import MetricLog, StageLoop
from .train_resume import Resumed, check_resume, devices_meta, resume, run_settings


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
    model, params = load_pretrained(ckpt, dtype=compute, param_dtype=jnp.float32, mesh=mesh,
                                    param_dtypes=lambda path: group_dtype(path[0]),
                                    remat=cfg.remat, remat_policy=cfg.remat_policy,
                                    scan_layers=cfg.scan_layers, attention_impl=cfg.attention_impl)
    if not isinstance(model, LlavaForConditionalGeneration):
        raise SystemExit(f"error: {ckpt} is a {type(model).__name__}; training needs a llava checkpoint")
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise SystemExit(f"error: {ckpt} has no tokenizer files; training needs the tokenizer")
    d, have = cfg.diysink, model.config.diysink
    if d.enabled and (have is None or (d.reweight and not have.reweight)):
        want = (DIYSinkConfig(SinkRule(**d.rule), d.select, d.reweight, d.rew_hidden,
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


def _loss(x) -> str:
    """A loss as printed: 4 significant digits (float32 noise such as 11.5600004196167 cut)."""
    return "-" if x is None else f"{x:.4g}"


def check_batch_layout(cfg) -> None:
    """Refuses (SystemExit) a ``batch_size`` the devices x ``optim.grad_accum`` micro-batches do
    not divide, and pmap loss groups (``optim.loss_group_rows``) that do not divide a device's rows."""
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


def setup(cfg, workdir: Path):
    """Checks the config, creates ``workdir``, joins the other processes, refuses an export
    folder this workdir does not own and a batch layout the devices cannot run; returns the
    device mesh (None for pmap)."""
    options.check_config(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    parallel.init_distributed(cfg.distributed)
    check_target(cfg, workdir / "export", workdir, "export")
    check_batch_layout(cfg)
    return (parallel.make_mesh(cfg.fsdp, tensor=cfg.tensor, dcn_data=cfg.dcn_data)
            if cfg.parallel == "mesh" else None)


def finished_already(cfg, workdir: Path, manager, settings: dict) -> Optional[dict]:
    """With a checkpoint there: refuses a changed run before anything is loaded
    (:func:`~vitsink_jax.train_resume.check_resume`) and returns the summary of a finished one
    (:func:`~vitsink_jax.train_export.finished`); else None."""
    if manager.latest_step() is None:
        return None
    check_resume(manager, manager.latest_step(), cfg, settings)
    done = finished(cfg, workdir, manager)
    if done is not None:
        print(f"already at step {cfg.steps} of {cfg.steps}; nothing to do (export in "
              f"{workdir / 'export'})")
    return done


def print_plan(cfg, trainable: dict) -> None:
    """One line: the stage, the params it trains, steps, batch, parallel layout, peak lrs, warmup."""
    accum = cfg.optim.grad_accum
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    print(f"stage {cfg.stage}: training {n_train / 1e6:.2f}M params "
          f"({', '.join(sorted(trainable))}), {cfg.steps} steps of {cfg.batch_size} rows"
          + (f" ({accum} micro-batches of {cfg.batch_size // accum})" if accum > 1 else "") + ", "
          f"parallel={cfg.parallel} on {jax.device_count()} device(s), "
          f"{jax.process_count()} process(es); peak lr "
          + ", ".join(f"{g} {lr:g}" for g, lr in train_lib.group_lrs(cfg.optim, cfg.stage, trainable).items())
          + f", warmup {train_lib.warmup_steps(cfg.optim, cfg.steps)} steps")


def training_batches(cfg, workdir: Path, model, tokenizer, settings: dict, resumed: Resumed,
                     manager) -> Batches:
    """The run's :class:`~vitsink_jax.train_data.Batches`. A resume whose data build kept other
    rows (another batch stream) is refused unless ``resume_changes=allow``, then recorded in
    ``resumed.changes``."""
    spec = token_spec(cfg, model, tokenizer)
    batches = Batches(load_data(cfg, workdir, spec, settings.get("sha256:data.json")), model,
                      tokenizer, cfg, spec=spec)
    digest = batches.records.digest
    if resumed.saved.get("data_digest", digest) != digest:
        change = (f"the instruction data's kept rows / lengths (digest {resumed.saved['data_digest']} "
                  f"in the checkpoint, {digest} now)")
        if cfg.resume_changes != "allow":
            raise SystemExit(f"error: {manager.directory} was trained on other rows: {change}; use the "
                             "data it was built from, or --config.resume_changes=allow")
        resumed.changes.append(change)
    return batches


def finish(cfg, workdir: Path, model, params: dict, tokenizer, loop: StageLoop, resumed: Resumed) -> dict:
    """Exports the trained ``params`` (:func:`~vitsink_jax.train_export.write_export`) and writes
    train_summary.json (process 0): the run's record, its first and last loss (with no step
    left to run, a re-export, the logged ones), skipped steps and data-wait share."""
    export = write_export(cfg, workdir, model, params, tokenizer)
    losses = loop.losses or loss_curve(workdir)
    meta = loop.meta
    summary = {**record(cfg, cfg.seed, meta["base_checkpoint"], meta["base_sha256"]), "stage": cfg.stage,
               "steps": cfg.steps, "resumed_from": resumed.start, "resume_changes": resumed.changes,
               "skipped_steps": loop.skipped, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "export": str(export),
               "data_wait_share": loop.wait_share}
    if jax.process_index() == 0:
        write_json(workdir / "train_summary.json", summary)
        print(f"losses: first {_loss(summary['first_loss'])}, last {_loss(summary['last_loss'])}; "
              + (f"{len(loop.skipped)} non-finite steps skipped; " if loop.skipped else "")
              + f"exported to {export}")
    return summary


def train(cfg, workdir: Path) -> dict:
    """Runs (or resumes) one stage; returns the summary also written to train_summary.json. A
    finished run (:func:`~vitsink_jax.train_export.finished`) changes nothing and returns its
    summary."""
    mesh = setup(cfg, workdir)
    ckpt = base_checkpoint(cfg, workdir)
    settings = run_settings(cfg, ckpt)
    manager = StateCheckpoints(workdir / "checkpoints", cfg.keep_checkpoints, cfg.checkpoint_storage)
    done = finished_already(cfg, workdir, manager, settings)
    if done is not None:
        return done
    model, params, tokenizer = load_model(cfg, ckpt, mesh)
    trainable, frozen = train_lib.split_params(params, train_lib.trainable_parts(
        cfg.stage, cfg.finetune_parts))
    tx, schedules = train_lib.make_optimizer(cfg.optim, cfg.steps, cfg.stage, tuple(trainable))
    state = {"step": jnp.asarray(0, jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
    runner = Runner(cfg, model, tx, schedules, frozen, mesh)
    state, resumed = resume(manager, runner, state, cfg, settings)
    print_plan(cfg, trainable)
    batches = training_batches(cfg, workdir, model, tokenizer, settings, resumed, manager)
    meta = {"base_checkpoint": str(ckpt), "base_sha256": settings["sha256:checkpoint"],
            "stage": cfg.stage, "scan_layers": cfg.scan_layers, "devices": devices_meta(cfg),
            "settings": settings, "resume_changes": resumed.changes, "data_digest": batches.records.digest}
    loop = StageLoop(cfg, runner, manager, MetricLog(workdir), meta, resumed)
    state = loop.run(state, batches)
    final = {**frozen, **runner.unplace(state)["trainable"]}
    return finish(cfg, workdir, model, final, tokenizer, loop, resumed)
