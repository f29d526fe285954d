"""evaluate.py's modes, one module each, and the table the CLI picks a mode from.

Each mode is ``run_<mode>(cfg, workdir) -> report`` (the dict it also writes as JSON under
``workdir``); the steps they share (which checkpoint, loading the model, reading images, the
sink rules, reading a benchmark) are in :mod:`vitsink_jax.modes.common`. Nothing below this
package imports it.
"""

from .analyze import run_analyze
from .benchmark import run_benchmark
from .demo import run_demo
from .interventions import run_interventions
from .score import run_score
from .study import run_study
from .sweep import run_sweep
from .vit import run_vit

# {config.mode: run function}; the order is the one --config.mode's error message lists
MODES = {"study": run_study, "demo": run_demo, "analyze": run_analyze, "benchmark": run_benchmark,
         "vit": run_vit, "interventions": run_interventions, "score": run_score, "sweep": run_sweep}
