"""Console scripts: ``vitsink-train`` and ``vitsink-eval`` run the checkout's train.py and
evaluate.py from any directory, as ``python train.py`` / ``python evaluate.py`` would (same
flags, same default configs: the scripts find them beside themselves).

They need the source checkout the package is installed from (``pip install -e .``): the two
scripts and configs/ live beside the package, not in it.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> None:
    path = ROOT / script
    if not path.is_file():
        sys.exit(f"error: {path} not found: the console scripts run the scripts of a source checkout "
                 "installed with pip install -e .")
    sys.argv[0] = str(path)
    sys.path.insert(0, str(ROOT))  # the configs import each other as configs.<name>
    runpy.run_path(str(path), run_name="__main__")


def train() -> None:
    """``vitsink-train``: train.py."""
    _run("train.py")


def evaluate() -> None:
    """``vitsink-eval``: evaluate.py."""
    _run("evaluate.py")
