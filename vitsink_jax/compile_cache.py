"""Compile time paid once: JAX's persistent compilation cache for the CLIs, and the compile
seconds a run spent.

train.py and evaluate.py call :func:`enable` with their ``compile_cache`` setting before
compiling anything: ``"auto"`` (default) is ``$VITSINK_JAX_CACHE``, JAX's ``$JAX_COMPILATION_CACHE_DIR`` or
``<user cache dir>/vitsink_jax/xla`` (``$XDG_CACHE_HOME`` or ``~/.cache``), a path is that
folder, ``""`` / ``"off"`` (or ``$VITSINK_JAX_CACHE=off`` with ``"auto"``) turns it off. Every compiled program is kept (no minimum compile
time), so a second run with the same shapes loads its executables instead of compiling them.
Each host keeps its own cache (no shared filesystem needed). JAX keys entries by the program,
the devices and the compiler flags, so a stale entry is never used. The same switch keeps what
checkpoints' config.json and tokenizer files resolve to in its ``vitsink_resolved`` subfolder
(:mod:`vitsink_jax.resolved`), so a repeat run does not import torch to read them.

:func:`stats` (written into every results JSON by :func:`vitsink_jax.provenance.record`) counts,
since :func:`enable`, the seconds spent tracing, lowering and compiling (a cache hit's load
counts as compile time) and the cache hits and misses.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import jax

# JAX's monitoring events (jax._src.dispatch / compiler): duration events -> our names
_DURATIONS = {"/jax/core/compile/jaxpr_trace_duration": "trace_seconds",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_seconds",
              "/jax/core/compile/backend_compile_duration": "compile_seconds"}
_COUNTS = {"/jax/compilation_cache/cache_hits": "cache_hits",
           "/jax/compilation_cache/cache_misses": "cache_misses"}
_totals: collections.Counter = collections.Counter()
_state = {"listening": False, "folder": None}


def default_folder() -> Path:
    """``$VITSINK_JAX_CACHE``, else JAX's own ``$JAX_COMPILATION_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/vitsink_jax/xla`` (``~/.cache`` when unset)."""
    for name in ("VITSINK_JAX_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        if os.environ.get(name):
            return Path(os.environ[name])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vitsink_jax" / "xla"


def _listen() -> None:
    if _state["listening"]:
        return
    _state["listening"] = True

    def duration(event: str, seconds: float, **_) -> None:
        if event in _DURATIONS:
            _totals[_DURATIONS[event]] += seconds

    def count(event: str, **_) -> None:
        if event in _COUNTS:
            _totals[_COUNTS[event]] += 1

    jax.monitoring.register_event_duration_secs_listener(duration)
    jax.monitoring.register_event_listener(count)


def enable(setting: str = "auto") -> Path | None:
    """Turns the persistent cache on in the folder ``setting`` names (see the module docstring)
    and starts counting compile time; returns the folder, or None when off."""
    _listen()
    if setting == "auto" and os.environ.get("VITSINK_JAX_CACHE") == "off":
        setting = "off"
    from . import resolved

    if setting in ("", "off"):
        _state["folder"] = None
        jax.config.update("jax_enable_compilation_cache", False)
        resolved.enable(None)
        return None
    folder = default_folder() if setting == "auto" else Path(setting).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _state["folder"] = folder
    resolved.enable(folder / "vitsink_resolved")  # parsed configs, tokenizer classes
    return folder


def stats() -> dict | None:
    """{"cache": folder or None, "trace_seconds", "lower_seconds", "compile_seconds",
    "cache_hits", "cache_misses"} since :func:`enable`; None when it was never called."""
    if not _state["listening"]:
        return None
    out = {"cache": str(_state["folder"]) if _state["folder"] else None}
    out.update({name: round(_totals[name], 3) for name in _DURATIONS.values()})
    out.update({name: _totals[name] for name in _COUNTS.values()})
    return out
