"""The model families by HF ``model_type``: how each reads and writes its config.json and which
Flax module runs it. Each family's file registers itself here (:func:`register_lvlm`,
:func:`register_tower`, :func:`register_llm`); this module imports no family, so the LVLM, the
converter and :mod:`vitsink_jax.config` (``config_from_hf``) look a family up without importing its
file, and no file of models/ imports another family's. The package's ``__init__`` imports every family (and
``import vitsink_jax`` the package), so all are registered before any lookup.

Three kinds, as config.json nests them:

* an LVLM (``llava``, ``gemma3``, ...): its config class (``from_hf(d)``, ``to_hf()``) and module;
* a vision tower (``vision_config``): the module, and the tower's fields beyond the shared ones
  of :class:`~vitsink_jax.config.VisionConfig` (``fields``: transformers' config object -> dict of
  VisionConfig fields; ``write``: adds its keys to the config.json dict), or a whole reader
  (``read``: config.json dict -> VisionConfig) for a tower with its own config class or an
  alias (a full CLIP checkpoint read as its vision half);
* an LLM (``text_config``): its fields beyond the shared ones of
  :class:`~vitsink_jax.config.TextConfig` (``fields``, ``write`` as for towers); every LLM runs
  in :class:`~vitsink_jax.models.llm.CausalLM`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional


def _no_fields(hf_config) -> dict:
    return {}


def _write_nothing(config, d: dict) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Family:
    """One registered ``model_type``. ``config``: an LVLM's config class; ``module``: the Flax
    module class (LVLMs and towers); ``fields`` / ``write`` / ``read``: a tower's or LLM's config
    reading (module docstring); ``alias``: a name ``read`` maps to a tower type (no tower type
    itself); ``part_of``: why a config.json of this type is not loaded by itself ("" when it is)."""

    kind: str  # "lvlm", "vision" or "text"
    config: Optional[type] = None
    module: Optional[type] = None
    fields: Callable[[Any], dict] = _no_fields
    write: Callable[[Any, dict], None] = _write_nothing
    read: Optional[Callable[[dict], Any]] = None
    alias: bool = False
    part_of: str = ""


_FAMILIES: dict = {}
KINDS = {"lvlm": "LVLM", "vision": "vision tower", "text": "LLM"}


def _register(model_types, family: Family) -> None:
    for model_type in model_types:
        if model_type in _FAMILIES:
            raise ValueError(f"model_type {model_type!r} is registered twice")
        _FAMILIES[model_type] = family


def register_lvlm(model_type: str, config: type, module: type) -> None:
    """An LVLM: its config class (``from_hf`` / ``to_hf``) and module class."""
    _register((model_type,), Family("lvlm", config=config, module=module))


def register_tower(model_types, module: Optional[type] = None, fields=_no_fields, write=_write_nothing,
                   read=None, alias: bool = False, part_of: str = "") -> None:
    """Vision towers of ``model_types`` (a tuple): their module and config reading."""
    _register(model_types, Family("vision", module=module, fields=fields, write=write, read=read,
                                  alias=alias, part_of=part_of))


def register_llm(model_types, fields=_no_fields, write=_write_nothing) -> None:
    """LLMs of ``model_types`` (a tuple), run by the shared CausalLM: their config reading."""
    _register(model_types, Family("text", fields=fields, write=write))


def model_types(kind: str, tower: bool = False, alone: bool = False) -> tuple:
    """The registered model_types of one kind ("lvlm", "vision", "text") in registration order;
    ``tower``: no aliases; ``alone``: only those a config.json loads by itself."""
    return tuple(t for t, f in _FAMILIES.items()
                 if f.kind == kind and not (tower and f.alias) and not (alone and f.part_of))


def family(model_type, kind: Optional[str] = None, tower: bool = False) -> Family:
    """The Family of ``model_type`` (of ``kind`` when given; ``tower``: not an alias);
    ValueError naming the supported ones otherwise."""
    f = _FAMILIES.get(model_type)
    if f is not None and kind in (None, f.kind) and not (tower and f.alias):
        return f
    if kind is not None:
        raise ValueError(f"unknown {kind} model_type {model_type!r}; supported: "
                         f"{sorted(model_types(kind, tower))}")
    kinds = "; ".join(f"{KINDS[k]} {', '.join(sorted(model_types(k, alone=True)))}" for k in KINDS)
    raise ValueError(f"unknown model_type {model_type!r}: not a family vitsink_jax runs; supported: {kinds}")


def module_class(config) -> type:
    """The Flax module class registered for an LVLM config or a VisionConfig (an LLM's is the
    shared CausalLM)."""
    return family(config.model_type).module


def vision_tower_class(config) -> type:
    """The tower module class for a VisionConfig."""
    return family(config.model_type, "vision", tower=True).module
