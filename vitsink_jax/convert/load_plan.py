"""The load plan: which checkpoint tensor(s) feed each param of a model, from the files'
headers alone.

For every param (loop or scanned layout) the plan holds its shape in our layout, the file, key
and first row of each source tensor (one, or the L per-layer keys stacked into a scanned
layer; the row is non-zero for a part of a fused tensor) and the transpose from HF's layout (a
linear kernel). Building it checks the checkpoint against the model: missing and unexpected
tensors, and shapes that disagree with the config. Nothing here reads tensor data except
:func:`untie_differing_head` (the two tensors it compares).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import ModelConfig
from .folders import read_config
from .hf import (abstract_params, canonical_key, fused_tensors, hf_key_to_path, hf_shape, ignored_patterns,
                 path_to_hf_key, split_key, to_hf_perm)
from .safetensors_io import CheckpointError


def first_few(items: list, n: int = 20) -> str:
    """The first ``n`` of ``items`` joined for an error message, with how many more there are."""
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def decoder_prefixes(paths) -> set:
    """Param-path prefixes of the decoders (the dicts holding ``embed_tokens``): their
    ``layers_i`` / ``layers`` children are the LLM layers that scanned layouts stack."""
    return {p[:p.index("embed_tokens")] for p in paths if "embed_tokens" in p}


def layer_split(path: tuple, decoders: set) -> tuple:
    """Loop-layout path -> (scanned path, layer index), or (path, None) outside decoder layers."""
    for d in decoders:
        if path[:len(d)] == d and len(path) > len(d):
            m = re.fullmatch(r"layers_(\d+)", path[len(d)])
            if m:
                return path[:len(d)] + ("layers",) + path[len(d) + 1:], int(m[1])
    return path, None


class Planned:
    """One param of the plan: its shape in our layout, the (reader, key, first row) per source
    tensor (one, or L for a scanned layer stack; the row is HF's first axis, 0 unless the tensor
    is fused: :func:`~vitsink_jax.convert.hf.fused_tensors`) and the transpose from HF's layout
    (None: as stored)."""

    __slots__ = ("shape", "sources", "stacked", "perm")

    def __init__(self, shape, sources, stacked, perm):
        self.shape, self.sources, self.stacked, self.perm = shape, sources, stacked, perm


def load_plan(path: Path, config: ModelConfig, model, readers: list) -> dict:
    """{param path of ``model`` (loop or scanned layout): Planned}, from the headers alone.

    Raises CheckpointError listing missing / unexpected tensors, or naming a tensor whose shape
    disagrees with the config (both shapes given)."""
    scanned = getattr(model, "scan_layers", False)
    targets = abstract_params(model.clone(scan_layers=False) if scanned else model)
    ignored = [re.compile(p) for p in ignored_patterns(config, read_config(path).get("model_type", ""))]
    found, unexpected = _match(readers, config, targets, ignored)
    missing = ["/".join(p) + f" (HF {path_to_hf_key(p)})" for p in targets if p not in found]
    if missing or unexpected:
        msg = [f"{path}: checkpoint does not match the {config.__class__.__name__} built from config.json"]
        if missing:
            msg.append(f"missing tensors ({len(missing)}): {first_few(missing)}")
        if unexpected:
            msg.append(f"unexpected tensors ({len(unexpected)}): {first_few(unexpected)}")
        raise CheckpointError("; ".join(msg))
    return _stack(targets, found, decoder_prefixes(targets) if scanned else set())


def _match(readers: list, config: ModelConfig, targets: dict, ignored: list) -> tuple:
    """({loop-layout param path: (reader, key, transpose, first row)}, [unexpected keys]): every
    tensor of ``readers`` matched to the param(s) it feeds; keys matching an ``ignored`` pattern
    are neither. Raises CheckpointError for a tensor of the wrong shape."""
    fused = fused_tensors(config)
    found, unexpected = {}, []
    for reader in readers:
        for key in reader.keys():
            canon = canonical_key(config, key)
            parts = split_key(canon, fused)
            if parts is not None:
                split = _split_sources(reader, key, parts, targets)
                if split is None:
                    unexpected.append(key)
                found.update(split or {})
                continue
            target = hf_key_to_path(canon, targets)
            if target is None:
                if not any(p.search(canon) for p in ignored):
                    unexpected.append(key)
                continue
            found[target] = _source(reader, key, target, tuple(targets[target].shape))
    return found, unexpected


def _source(reader, key: str, target: tuple, want: tuple) -> tuple:
    """(reader, key, transpose, first row 0) of the tensor ``key`` feeding param ``target`` of
    shape ``want`` (our layout); raises CheckpointError naming both shapes when they differ."""
    shape = tuple(reader.tensors[key].shape)
    perm = to_hf_perm(target, len(shape))
    ours = tuple(shape[i] for i in np.argsort(perm)) if perm else shape
    if ours != want:
        raise CheckpointError(f"{reader.path}: tensor {key!r} has shape {shape} "
                              f"but the config needs {hf_shape(target, want)} (param "
                              f"{'/'.join(target)})")
    return reader, key, perm, 0


def _stack(targets: dict, found: dict, decoders: set) -> dict:
    """The plan in model order: one source per param, or, under the ``decoders`` of a scanned
    model, each layer stack's L sources in layer-index order with shape [L, ...]."""
    plan = {}
    for target in targets:
        reader, key, perm, row = found[target]
        dest, layer = layer_split(target, decoders)
        if layer is None:
            plan[dest] = Planned(tuple(targets[target].shape), [(reader, key, row)], False, perm)
        else:
            entry = plan.setdefault(dest, Planned(None, [], True, perm))
            entry.sources.append((layer, reader, key, row))
            entry.shape = (len(entry.sources),) + tuple(targets[target].shape)
    for entry in plan.values():
        if entry.stacked:
            entry.sources = [s[1:] for s in sorted(entry.sources, key=lambda s: s[0])]
    return plan


def _split_sources(reader, key: str, parts: tuple, targets: dict) -> Optional[dict]:
    """{param path: (reader, key, transpose, first row)} for the parts (canonical keys, in row
    order) of the fused tensor ``key``, or None when the model has no such params. Raises
    CheckpointError when the parts' shapes do not stack to the tensor's."""
    paths = [hf_key_to_path(p, targets) for p in parts]
    if None in paths:
        return None
    shape = tuple(reader.tensors[key].shape)
    hf = [hf_shape(p, tuple(targets[p].shape)) for p in paths]
    if sum(h[0] for h in hf) != shape[0] or any(h[1:] != shape[1:] for h in hf):
        raise CheckpointError(f"{reader.path}: fused tensor {key!r} has shape {shape} but the config "
                              f"needs {', '.join(parts)} of shapes {hf} stacked on its first axis")
    rows = np.cumsum([0] + [h[0] for h in hf])
    return {p: (reader, key, to_hf_perm(p, len(h)), int(r)) for p, h, r in zip(paths, hf, rows)}



def untie_differing_head(path: Path, config: ModelConfig, readers: list) -> ModelConfig:
    """``config`` with its LM head untied when config.json ties it but the checkpoint holds an
    ``lm_head.weight`` [vocab, hidden] other than the embedding, as transformers 5 loads such a
    file (with a warning naming both tensors) -- the head is never dropped for the embedding."""
    from ..config import LlavaConfig, TextConfig, tied_head

    text = config.text if isinstance(config, LlavaConfig) else config
    if not isinstance(text, TextConfig) or not text.tie_word_embeddings:
        return config
    found = {}
    for reader in readers:
        for key in reader.keys():
            m = re.search(r"(^|\.)(lm_head|model\.embed_tokens)\.weight$", canonical_key(config, key))
            if m:
                found[m[2]] = (reader, key)
    if "lm_head" not in found or "model.embed_tokens" not in found:
        return config
    (hr, head), (er, embed) = found["lm_head"], found["model.embed_tokens"]
    if np.array_equal(hr.read(head), er.read(embed)):
        return config
    warnings.warn(f"{path}: config.json ties the LM head to the embedding (tie_word_embeddings), but "
                  f"the checkpoint's {head!r} differs from {embed!r}: loaded untied, as transformers "
                  "does; set tie_word_embeddings false in config.json to silence this", stacklevel=3)
    untied = tied_head(text, False)
    return dataclasses.replace(config, text=untied) if isinstance(config, LlavaConfig) else untied

