"""What a checkpoint's files resolve to through transformers, remembered per exact content, so
a repeat run starts without importing torch.

Reading a config.json (:func:`vitsink_jax.config.config_from_hf`) goes through transformers'
config classes and ``AutoTokenizer`` picks a checkpoint's tokenizer class; both import torch
when it is installed (transformers' config module does), which is most of a warm CLI start on
a small model. With a folder enabled (the CLIs enable ``<compile cache>/vitsink_resolved``
with the compile cache, :func:`vitsink_jax.compile_cache.enable`), the parsed config and the
tokenizer's class are written there on first use and read back afterwards:

* a config entry is keyed by the config dict, transformers' version and the source of the
  parser (``config.py``, ``sinks/detect.py``, the family files of ``models/`` that read their
  own keys): a change to any of them parses again;
* a tokenizer entry is keyed by the contents of the folder's ``config.json``,
  ``tokenizer_config.json``, ``tokenizer.json`` and ``tekken.json`` (what ``AutoTokenizer``
  reads to choose), the folder's path, and the versions of transformers, tokenizers,
  sentencepiece and mistral-common; it names the class, which then loads the folder as
  ``AutoTokenizer`` would have (``cls.from_pretrained(folder, local_files_only=True)``).

* a param-shapes entry (:func:`param_shapes`: the abstract params of a model, which otherwise
  trace its whole ``init``) is keyed by the module's class and fields (config, param dtype,
  layout), the source of ``models/`` and ``config.py`` and the versions of jax and flax; it is
  also remembered in the process, folder or not.

Entries are small JSON files written atomically; an unreadable one is resolved again, and a
folder that cannot be written costs only a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import warnings
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from .atomic import write_text_atomic

_state = {"folder": None}
TOKENIZER_DECIDERS = ("config.json", "tokenizer_config.json", "tokenizer.json", "tekken.json")
# packages whose presence or version can change the class AutoTokenizer picks or how it loads
TOKENIZER_PACKAGES = ("tokenizers", "sentencepiece", "mistral-common")


def enable(folder) -> Optional[Path]:
    """Remembers resolutions in ``folder`` (created), or nowhere with None. Returns the folder."""
    _state["folder"] = None if folder is None else Path(folder)
    if _state["folder"] is not None:
        _state["folder"].mkdir(parents=True, exist_ok=True)
    return _state["folder"]


@lru_cache(maxsize=None)
def _versions() -> bytes:
    """transformers' version and the config parser's source (config.py and the family files of
    models/, which read their own keys): a change to either misses."""
    here = Path(__file__).resolve().parent
    files = [here / f for f in ("config.py", "sinks/detect.py", "resolved.py")] + sorted((here / "models").glob("*.py"))
    code = b"".join(f.read_bytes() for f in files)
    return metadata.version("transformers").encode() + b"\0" + code


def _key(kind: str, *parts: bytes) -> str:
    h = hashlib.sha256(kind.encode() + b"\0" + _versions())
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:32]


def _remembered(kind: str, parts: tuple, resolve: Callable[[], object], encode, decode):
    """``resolve()``, or its earlier result stored under (kind, parts) when a folder is set. A
    folder that cannot be read or written only costs the resolution (a warning), never the load."""
    folder = _state["folder"]
    if folder is None:
        return resolve()
    path = folder / f"{kind}-{_key(kind, *parts)}.json"
    if path.is_file():
        try:
            return decode(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError):
            pass  # unreadable or from other code: resolved again and rewritten
    value = resolve()
    try:
        write_text_atomic(path, json.dumps(encode(value)))
    except (OSError, TypeError, ValueError) as e:
        warnings.warn(f"not remembering the {kind} resolution in {folder}: {e}", stacklevel=3)
    return value


# ---------------------------------------------------------------------------------- configs ---

def _encode(x):
    """Frozen config dataclasses (nested, with tuples) -> JSON-able, tagged with their class."""
    if dataclasses.is_dataclass(x):
        return {"__class__": f"{type(x).__module__}:{type(x).__qualname__}",
                **{f.name: _encode(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v) for v in x]}
    if isinstance(x, (dict, list)):
        raise TypeError(f"config field value {x!r}: configs hold tuples, not {type(x).__name__}")
    return x


def _decode(x):
    if isinstance(x, list):
        raise TypeError("a config entry holds no lists")
    if not isinstance(x, dict):
        return x
    if "__tuple__" in x:
        return tuple(_decode(v) for v in x["__tuple__"])
    module, name = x["__class__"].split(":")
    if not module.startswith("vitsink_jax."):
        raise ImportError(f"{module} is not a vitsink_jax module")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{k: _decode(v) for k, v in x.items() if k != "__class__"})


def config(raw: dict, parse: Callable[[dict], object]):
    """``parse(raw)`` (:func:`vitsink_jax.config.config_from_hf`), remembered per content."""
    return _remembered("config", (json.dumps(raw, sort_keys=True).encode(),), lambda: parse(raw),
                       _encode, _decode)


# ------------------------------------------------------------------------------- tokenizers ---

def tokenizer(folder: Path):
    """The folder's tokenizer as ``AutoTokenizer.from_pretrained(folder, local_files_only=True)``
    gives it; its class remembered per content of :data:`TOKENIZER_DECIDERS`."""
    parts = tuple((folder / f).read_bytes() if (folder / f).is_file() else b"" for f in TOKENIZER_DECIDERS)
    parts += (str(folder.resolve()).encode(),  # AutoTokenizer matches some model paths by name
              "\0".join(_version(p) for p in TOKENIZER_PACKAGES).encode())
    loaded = {}

    def resolve() -> str:
        from transformers import AutoTokenizer

        loaded["tok"] = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return _importable(type(loaded["tok"]))

    cls = _remembered("tokenizer", parts, resolve, lambda name: name, _tokenizer_class)
    if "tok" in loaded:  # resolved just now
        return loaded["tok"]
    return cls.from_pretrained(str(folder), local_files_only=True)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _importable(cls) -> str:
    """The name transformers exports ``cls`` under ("" when it does not: never remembered)."""
    import transformers

    return cls.__name__ if getattr(transformers, cls.__name__, None) is cls else ""


def _tokenizer_class(name: str):
    if not name:
        raise KeyError("no importable tokenizer class remembered")
    import transformers

    return getattr(transformers, name)


# ----------------------------------------------------------------------------- param shapes ---

_SHAPES: dict = {}  # this process's param shapes by key, folder or not


@lru_cache(maxsize=None)
def _model_code() -> bytes:
    """The source of the modules that decide a model's params, and jax's and flax's versions."""
    here = Path(__file__).resolve().parent
    files = sorted((here / "models").glob("*.py")) + [here / "config.py"]
    return b"".join(f.read_bytes() for f in files) + "\0".join(
        metadata.version(p) for p in ("jax", "flax")).encode()


def param_shapes(model, trace: Callable[[], dict]) -> dict:
    """``trace()`` ({param path tuple: jax.ShapeDtypeStruct}: the abstract params of the flax
    ``model``, :func:`vitsink_jax.convert.hf.abstract_params`), remembered per model (its class
    and every field but parent / name) in this process and, with a folder, on disk. Returns a
    new dict each call."""
    fields = {f.name: repr(getattr(model, f.name)) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name")}
    parts = (type(model).__qualname__.encode(), json.dumps(fields, sort_keys=True).encode(), _model_code())
    key = _key("shapes", *parts)
    if key not in _SHAPES:
        _SHAPES[key] = _remembered("shapes", parts, trace, _encode_shapes, _decode_shapes)
    return dict(_SHAPES[key])


def _encode_shapes(shapes: dict) -> list:
    return [[list(path), list(x.shape), str(x.dtype)] for path, x in shapes.items()]


def _decode_shapes(entries: list) -> dict:
    import jax
    import jax.numpy as jnp

    return {tuple(path): jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)) for path, shape, dtype in entries}
