"""What defines a training run and how it resumes: the settings stored in every checkpoint
(:data:`RUN_KEYS`, :func:`run_settings`), a resume with other settings or devices refused
(:func:`check_resume`), the newest finite checkpoint restored (:func:`restore_checkpoint`,
:func:`resume`), and
the error of a run stopped by a non-finite step (:func:`nonfinite_error`).

Used by :mod:`vitsink_jax.trainer`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from . import options, train_lib
from .convert.folders import resolve_model_path
from .convert.writing import checkpoint_hash
from .scores import file_sha256


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
    flat["sha256:checkpoint"] = checkpoint_hash(ckpt)
    if cfg.get("vision_tower"):  # a fresh LLaVA's base folder names its tower by path only
        flat["sha256:vision_tower"] = checkpoint_hash(resolve_model_path(cfg.vision_tower))
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


@dataclasses.dataclass
class Resumed:
    """Where a stage starts: its first data step, the resumed checkpoint's meta ({} for a new
    run), the setting changes of the run's history and the steps skipped before ``start``."""
    start: int = 0
    saved: dict = dataclasses.field(default_factory=dict)
    changes: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)


def resume(manager, runner, state, cfg, settings: dict) -> tuple:
    """(placed state, :class:`Resumed`): ``state`` placed by ``runner``
    (:class:`~vitsink_jax.trainer.Runner`), or the newest finite
    checkpoint restored into it (:func:`restore_checkpoint`)."""
    state = runner.place(state)
    if manager.latest_step() is None:
        return state, Resumed()
    one, saved, changes = restore_checkpoint(manager, runner.unplace(state), cfg, settings)
    start = int(saved["data_step"])
    print(f"resumed from {manager.directory} at step {start}"
          + (f" with changed settings: {'; '.join(changes)}" if changes else ""))
    # the run's history so far (every earlier session's) carries on in the checkpoints
    return runner.place(one), Resumed(start, saved, saved.get("resume_changes", []) + changes,
                                      [s for s in saved.get("skipped_steps", []) if s < start])
