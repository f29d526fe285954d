"""The trained model's export and the folders a workdir owns: ``workdir/export`` written aside
and put in place whole, stamped as the workdir's (:func:`write_export`); a folder holding files
the workdir did not write refused before training (:func:`check_target`); a finished run
recognised (:func:`finished`). Every decision is process 0's (its disk holds the folders).

Used by :mod:`vitsink_jax.trainer` and train.py's recipes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from . import atomic, eval_settings, parallel, paths
from .convert.writing import save_pretrained


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
            save_pretrained(model, params, staged, dtype=jnp.float32)
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
