"""Hugging Face checkpoint keys <-> vitsink_jax param paths, and the models they fill.

The conversion is declarative: a checkpoint key is first normalised to one canonical HF spelling
(the one transformers 5 writes) by a short list of prefix aliases, then mapped to our param path by
one generic rule: ``a.layers.3.b.weight`` -> ``a/layers_3/b/{kernel|scale|embedding}``, picking
the leaf our model actually has. Linear kernels are transposed, conv kernels go OIHW -> HWIO.
The reverse rule gives ``save_pretrained``. Reading and writing the files:
:mod:`vitsink_jax.convert.load_plan`, :mod:`~vitsink_jax.convert.reading`,
:mod:`~vitsink_jax.convert.writing`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from .. import resolved
from ..config import LlavaConfig, ModelConfig, TextConfig, VisionConfig
from ..models import registry
from ..models.llm import CausalLM
from ..models.qwen2_5_vl import Qwen2_5_VLConfig


# ---------------------------------------------------------------------------------------------
# Key normalisation: checkpoint spelling -> canonical HF spelling (what transformers 5 writes)
# ---------------------------------------------------------------------------------------------

_ALIASES = {
    "llava": [(r"^model\.vision_tower\.(vision_model\.)?", "vision_tower."),
              (r"^vision_tower\.vision_model\.", "vision_tower."),
              (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
              (r"^model\.language_model\.", "language_model.model."),
              (r"^lm_head\.", "language_model.lm_head.")],
    # Qwen2.5-VL: model.visual / model.language_model / lm_head in memory, visual / model /
    # lm_head in the files transformers writes; the merger is our projector
    "qwen2_5_vl": [(r"^(model\.)?visual\.merger\.", "multi_modal_projector."),
                   (r"^(model\.)?visual\.", "vision_tower."),
                   (r"^model\.(language_model\.)?", "language_model.model."),
                   (r"^lm_head\.", "language_model.lm_head.")],
    "vision": [(r"^vision_model\.", "")],
    "text": [],
}

# canonical key -> the key written on save where it differs (Qwen2.5-VL: the spelling
# transformers' own save_pretrained writes, which its loader renames)
_EXPORTS = {
    "qwen2_5_vl": [(r"^multi_modal_projector\.", "visual.merger."),
                   (r"^vision_tower\.", "visual."),
                   (r"^language_model\.model\.", "model."),
                   (r"^language_model\.lm_head\.", "lm_head.")],
}

# Tensors that checkpoints carry but the model does not need (buffers, the text half of CLIP).
_IGNORED = [r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)embeddings\.position_ids$"]
_IGNORED_FULL_VISION = [r"^(text_model\.|logit_scale$|logit_bias$|visual_projection\.|text_projection\.)"]


def _family(config: ModelConfig) -> str:
    """The key table of a config: "llava" for every LVLM (LLaVA and Gemma 3 checkpoints spell
    their parts alike), "vision" or "text"."""
    if isinstance(config, Qwen2_5_VLConfig):
        return "qwen2_5_vl"
    if isinstance(config, LlavaConfig):
        return "llava"
    return "vision" if isinstance(config, VisionConfig) else "text"


def rename_first(key: str, rules) -> str:
    """``key`` rewritten by the first of ``rules`` ((regex, replacement), ...) that matches it,
    or unchanged."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def canonical_key(config: ModelConfig, key: str) -> str:
    return rename_first(key, _ALIASES[_family(config)])


def export_key(config: ModelConfig, key: str) -> str:
    """The checkpoint key ``save_pretrained`` writes for a canonical key (the canonical key
    itself unless the family's transformers class reads only its own spelling)."""
    return rename_first(key, _EXPORTS.get(_family(config), ()))


def ignored_patterns(config: ModelConfig, original_model_type: str) -> list:
    pats = list(_IGNORED)
    if original_model_type in ("clip", "siglip"):
        pats += _IGNORED_FULL_VISION
    text = config.text if isinstance(config, LlavaConfig) else config
    if isinstance(text, TextConfig) and text.tie_word_embeddings:
        pats.append(r"(^|\.)lm_head\.weight$")  # tied: the embedding serves as the head
    return pats


_LLM_LAYER = r"(?:language_model\.)?model\.layers\.\d+\."  # the LLM's layers, alone or in a LLaVA


def fused_tensors(config: ModelConfig) -> tuple:
    """((fused HF module name, its parts' names), ...) inside the LLM's layers: checkpoint
    tensors holding several of our params stacked on HF's first axis (Phi-3's ``qkv_proj`` = q,
    k, v rows; ``gate_up_proj`` = gate, up rows). Loading splits them (row ranges), saving
    concatenates the parts again. A vision tower's own q / k / v are never fused."""
    text = config.text if isinstance(config, LlavaConfig) else config
    if isinstance(text, TextConfig) and text.model_type == "phi3":
        return (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")))
    return ()


def _match(key: str, name: str):
    return re.fullmatch(rf"({_LLM_LAYER}){re.escape(name)}\.(weight|bias)", key)


def split_key(key: str, fused: tuple) -> Optional[tuple]:
    """The canonical keys of the parts of a fused canonical ``key`` (in row order), or None."""
    for name, parts in fused:
        m = _match(key, name)
        if m:
            return tuple(f"{m[1]}{part}.{m[2]}" for part in parts)
    return None


def fused_key(key: str, fused: tuple) -> Optional[tuple]:
    """(the fused canonical key, this part's index) for a part's canonical ``key``, or None."""
    for name, parts in fused:
        for i, part in enumerate(parts):
            m = _match(key, part)
            if m:
                return f"{m[1]}{name}.{m[2]}", i
    return None


# ---------------------------------------------------------------------------------------------
# Canonical HF key <-> our param path
# ---------------------------------------------------------------------------------------------

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def _segments(key: str) -> list:
    out, parts = [], key.split(".")
    i = 0
    while i < len(parts):
        if parts[i] in ("layers", "layer", "blocks") and i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def hf_key_to_path(key: str, targets: dict) -> Optional[tuple]:
    """Canonical HF key -> our param path (a key of ``targets``), or None if it has none."""
    segs = _segments(key)
    if segs[-1] == "weight":
        for leaf in _WEIGHT_LEAVES:
            path = tuple(segs[:-1]) + (leaf,)
            if path in targets:
                return path
        return None
    path = tuple(segs)
    return path if path in targets else None


def path_to_hf_key(path: tuple) -> str:
    segs = []
    for s in path:
        m = re.fullmatch(r"(layers?|blocks)_(\d+)", s)
        segs.append(f"{m.group(1)}.{m.group(2)}" if m else s)
    if segs[-1] in _WEIGHT_LEAVES:
        segs[-1] = "weight"
    return ".".join(segs)


def to_hf_perm(path: tuple, ndim: int) -> Optional[tuple]:
    """The axis permutation from our layout to HF's for the param at ``path`` (linear kernels
    transposed, conv kernels HWIO -> OIHW, 3-D conv kernels DHWIO -> OIDHW), or None where both
    layouts agree. HF -> ours is its inverse (``np.argsort``)."""
    if path[-1] != "kernel":
        return None
    return {5: (4, 3, 0, 1, 2), 4: (3, 2, 0, 1)}.get(ndim, (1, 0))


def hf_shape(path: tuple, shape: tuple) -> tuple:
    """The shape HF stores the param at ``path`` in, from its shape in our layout."""
    perm = to_hf_perm(path, len(shape))
    return tuple(shape[i] for i in perm) if perm else tuple(shape)


# ---------------------------------------------------------------------------------------------
# Models and abstract params
# ---------------------------------------------------------------------------------------------

def build_model(config: ModelConfig, dtype=jnp.float32, param_dtype=None, **options):
    """The Flax module for a config (LVLM, vision tower or LLM); ``options`` are module fields
    such as ``remat=True``, ``scan_layers=True`` (LLM and LVLM)."""
    cls = CausalLM if isinstance(config, TextConfig) else registry.module_class(config)
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__} has no option {', '.join(unknown)}")
    return cls(config, dtype=dtype, param_dtype=param_dtype or dtype, **options)


def example_inputs(config: ModelConfig) -> dict:
    """Smallest valid inputs for ``model.init`` / ``jax.eval_shape``."""
    if isinstance(config, VisionConfig):
        v = config
        return {"pixel_values": jnp.zeros((1, v.num_channels, v.image_size, v.image_size))}
    if isinstance(config, TextConfig):
        return {"input_ids": jnp.zeros((1, 1), jnp.int32)}
    v = config.vision
    ids = jnp.full((1, config.num_image_tokens), config.image_token_index, jnp.int32)
    return {"input_ids": ids, "question_mask": jnp.zeros(ids.shape, bool),  # DIYSink ReW reads it
            "pixel_values": jnp.zeros((1, v.num_channels, config.input_size, config.input_size))}


def init_params(model, rng=None) -> dict:
    """Random params for ``model`` (e.g. a model built from a config to train from scratch)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return model.init(rng, **example_inputs(model.config))["params"]


def abstract_params(model) -> dict:
    """{param path: ShapeDtypeStruct} without allocating anything, remembered per model
    (:func:`vitsink_jax.resolved.param_shapes`): a load after the first traces no ``init``."""
    return resolved.param_shapes(
        model, lambda: traverse_util.flatten_dict(jax.eval_shape(lambda: init_params(model))))


__all__ = ["build_model", "init_params", "abstract_params", "canonical_key", "hf_key_to_path",
           "path_to_hf_key", "export_key", "to_hf_perm", "hf_shape", "ignored_patterns", "fused_tensors",
           "split_key", "fused_key", "rename_first"]
