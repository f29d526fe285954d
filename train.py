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
``--config.overwrite_export=True`` (:func:`vitsink_jax.train_export.check_target`). A workdir
whose run is finished (checkpoint at step N of N, summary and export intact) is left as it is
(:func:`vitsink_jax.train_export.finished`). Metrics go to ``workdir/metrics.jsonl`` and
TensorBoard files in ``workdir/tb``. The workdir, the checkpoint and the publish folder may be
``gs://`` URIs (see :mod:`vitsink_jax.paths`).

This file is the CLI (flags, ``main``, the recipe runs); one stage's training, in named steps,
is :func:`vitsink_jax.trainer.train`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
from absl import flags
from ml_collections import config_flags

from vitsink_jax import cli, compile_cache, options, paths, train_lib
from vitsink_jax.train_export import check_target, on_writer, owner
from vitsink_jax.trainer import loss_curve, train


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
    ``workdir/<name>``; a finished run changes nothing:
    :func:`vitsink_jax.train_export.finished`), then copies the
    exports named in ``cfg.publish`` ({published name: run name}) to ``cfg.publish_dir``
    (default ``workdir/published``, replaced whole: :func:`vitsink_jax.mini_study.publish`) with
    one training record: the recipe, every run's summary (config, seed, versions, hashes) and
    loss curve; unless it holds what this workdir published from these very exports already.
    A publish folder holding files this workdir did not write there is refused before any
    training (:func:`vitsink_jax.train_export.check_target`)."""
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
