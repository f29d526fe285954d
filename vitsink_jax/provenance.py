"""Provenance records for results (config, seed, package versions, checkpoint hash) and atomic
JSON writing, shared by the CLIs."""

from __future__ import annotations

import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from . import compile_cache, paths
from .atomic import write_text_atomic

PACKAGES = ("vitsink_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex",
            "transformers", "safetensors", "numpy", "torch")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else the platform's word for it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where and when a figure was measured: CPU model, cores this process may use, the JAX
    device kind and count, and the date (UTC)."""
    import datetime

    import jax

    devices = jax.devices()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": cores, "device_kind": devices[0].device_kind,
            "devices": len(devices), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def record(config: Any, seed: int, checkpoint: str | None = None,
           checkpoint_sha256: str | None = None) -> dict:
    """What produced a result: the config, seed, package versions, machine and date
    (:func:`machine`), checkpoint and its hash, and, in a CLI run, its compile time and cache
    use so far (:func:`compile_cache.stats`)."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out = {"config": cfg, "seed": seed, "versions": package_versions(), "machine": machine(),
           "checkpoint": checkpoint, "checkpoint_sha256": checkpoint_sha256}
    compiled = compile_cache.stats()
    return out if compiled is None else {**out, "compile": compiled}


def file_stem(*parts: str) -> str:
    """A file name stem from ``parts`` (a variant or intervention spec, a model or image name)
    joined by "_", in ``[a-z0-9_.-]`` only: other characters (``:``, ``+``, ``=``, spaces) become
    "_", so names are safe in every shell and file system (``fastv+sinks:0.5:2`` ->
    ``fastv_sinks_0.5_2``)."""
    import re

    return re.sub(r"[^a-z0-9_.-]+", "_", "_".join(p for p in parts if p).lower()).strip("_")


def write_json(path, obj) -> Path:
    """Writes JSON atomically (temporary file in the same folder, then os.replace)."""
    return write_text_atomic(path, json.dumps(_clean(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def merge_json(path, key: str, value) -> Path:
    """Sets ``key`` of the JSON object in ``path`` to ``value`` (the other keys kept), atomically
    (e.g. one benchmark's entry of benchmarks/results.json)."""
    return write_json(path, {**json.loads(paths.path(path).read_text()), key: value})


def write_jsonl(path, rows) -> Path:
    """Writes one strict-JSON object per line, atomically."""
    return write_text_atomic(path, "".join(json.dumps(_clean(r), sort_keys=True, allow_nan=False) + "\n"
                                       for r in rows))


def _clean(x):
    """Arrays -> lists, NaN / inf -> None (strict JSON), recursively."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)
