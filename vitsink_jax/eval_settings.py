"""The evaluation settings a checkpoint carries: ``vitsink_eval.json`` beside its weights.

A model is scored as it was trained: with its multiple-choice format (``letter`` or ``cloze``),
its system prompt and prompt templates, and the sink rule its sink path (DIYSink) or its
sink-to-the-front variant was made with. train.py writes them with every export (from the
training config); the shipped mini-study models carry theirs. evaluate.py applies them to every
mode that scores one checkpoint (benchmark, analyze, sweep, demo), except for the keys the user
gives on the command line, and says which it applied.

The file is a flat JSON object ``{"eval.mc_format": "cloze", "sink.rule": "topk", "sink.k": 4}``
whose keys are evaluate.py config keys from :data:`KEYS`.
"""

from __future__ import annotations

import json

from . import paths
from .convert.safetensors_io import CheckpointError

FILE = "vitsink_eval.json"
KEYS = ("eval.mc_format", "eval.system", "eval.templates", "sink.rule", "sink.tau", "sink.k",
        "sink.max_fraction", "sink.min_ratio")


def read(folder) -> dict:
    """The settings of checkpoint ``folder`` ({} when it has no :data:`FILE`). Raises
    CheckpointError naming the file for a file that is not a JSON object of :data:`KEYS`."""
    path = paths.path(folder) / FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: holds a {type(settings).__name__}, not an object of settings")
    unknown = sorted(set(settings) - set(KEYS))
    if unknown:
        raise CheckpointError(f"{path}: unknown setting(s) {unknown}; known: {', '.join(KEYS)}")
    return settings


def from_training(cfg) -> dict:
    """The settings a train.py config trained its export with: the data's multiple-choice format
    and system prompt, and (a DIYSink run: ``diysink.enabled``) the sink rule that routes
    tokens to its projectors."""
    out = {"eval.mc_format": cfg.data.mc_format, "eval.system": cfg.data.get("system", "")}
    if cfg.get("diysink") is not None and cfg.diysink.get("enabled") and cfg.diysink.get("rule") is not None:
        out.update({f"sink.{k}": v for k, v in cfg.diysink.rule.items()})
    return out


def apply(cfg, settings: dict, given) -> list:
    """Sets each of ``settings`` on ``cfg`` (an evaluate.py ConfigDict) unless its key is in
    ``given`` (the keys the user set on the command line); returns the ``key=value`` applied."""
    applied = []
    for key, value in settings.items():
        if key in given or any(key.startswith(g + ".") for g in given):
            continue
        section, name = key.split(".", 1)
        old = cfg[section][name]
        cfg[section][name] = type(old)(value) if not hasattr(old, "items") else type(old)(dict(value))
        applied.append(f"{key}={value!r}")
    return applied
