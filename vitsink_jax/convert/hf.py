"""Hugging Face PyTorch checkpoints <-> vitsink_jax Flax params.

The conversion is declarative: a checkpoint key is first normalised to one canonical HF spelling
(the one transformers 5 writes) by a short list of prefix aliases, then mapped to our param path by
one generic rule: ``a.layers.3.b.weight`` -> ``a/layers_3/b/{kernel|scale|embedding}``, picking
the leaf our model actually has. Linear kernels are transposed, conv kernels go OIHW -> HWIO.
The reverse rule gives ``save_pretrained``.

Files read: ``config.json`` plus ``model.safetensors``, or sharded ``*.safetensors`` with
``model.safetensors.index.json``, or ``pytorch_model.bin`` (optionally sharded with its index),
loaded with ``torch.load(weights_only=True)``; torch is imported for that path only. Tensors are
read one at a time. Any problem raises :class:`CheckpointError` naming the file, key or shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from ..config import LlavaConfig, ModelConfig, TextConfig, VisionConfig, config_from_hf
from ..models.llm import CausalLM, stack_layers, unstack_layers
from ..models.lvlm import LlavaForConditionalGeneration
from ..models.dinov2 import vision_tower_class

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
PROGRESS_MIN_TENSORS = 200  # auto progress bar above this many tensors


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted faithfully (missing/corrupt file, bad keys/shapes)."""


# ---------------------------------------------------------------------------------------------
# Key normalisation: checkpoint spelling -> canonical HF spelling (what transformers 5 writes)
# ---------------------------------------------------------------------------------------------

_ALIASES = {
    "llava": [(r"^model\.vision_tower\.", "vision_tower."),
              (r"^vision_tower\.vision_model\.", "vision_tower."),
              (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
              (r"^model\.language_model\.", "language_model.model."),
              (r"^lm_head\.", "language_model.lm_head.")],
    "vision": [(r"^vision_model\.", "")],
    "text": [],
}

# Tensors that checkpoints carry but the model does not need (buffers, the text half of CLIP).
_IGNORED = [r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)embeddings\.position_ids$"]
_IGNORED_FULL_VISION = [r"^(text_model\.|logit_scale$|logit_bias$|visual_projection\.|text_projection\.)"]


def _family(config: ModelConfig) -> str:
    return {LlavaConfig: "llava", VisionConfig: "vision", TextConfig: "text"}[type(config)]


def canonical_key(config: ModelConfig, key: str) -> str:
    for pattern, repl in _ALIASES[_family(config)]:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    return key


def _ignored_patterns(config: ModelConfig, original_model_type: str) -> list:
    pats = list(_IGNORED)
    if original_model_type in ("clip", "siglip"):
        pats += _IGNORED_FULL_VISION
    text = config.text if isinstance(config, LlavaConfig) else config
    if isinstance(text, TextConfig) and text.tie_word_embeddings:
        pats.append(r"(^|\.)lm_head\.weight$")  # tied: the embedding serves as the head
    return pats


# ---------------------------------------------------------------------------------------------
# Canonical HF key <-> our param path
# ---------------------------------------------------------------------------------------------

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def _segments(key: str) -> list:
    out, parts = [], key.split(".")
    i = 0
    while i < len(parts):
        if parts[i] in ("layers", "layer") and i + 1 < len(parts) and parts[i + 1].isdigit():
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
        m = re.fullmatch(r"(layers?)_(\d+)", s)
        segs.append(f"{m.group(1)}.{m.group(2)}" if m else s)
    if segs[-1] in _WEIGHT_LEAVES:
        segs[-1] = "weight"
    return ".".join(segs)


def to_flax(path: tuple, array: np.ndarray) -> np.ndarray:
    """HF tensor -> our layout (linear kernels transposed, conv OIHW -> HWIO)."""
    if path[-1] == "kernel":
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
    return array


def to_hf(path: tuple, array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    return array


# ---------------------------------------------------------------------------------------------
# Models and abstract params
# ---------------------------------------------------------------------------------------------

def build_model(config: ModelConfig, dtype=jnp.float32, param_dtype=None, **options):
    """The Flax module for a config (LVLM, vision tower or LLM); ``options`` are module fields
    such as ``remat=True``, ``scan_layers=True`` (LLM and LVLM)."""
    if isinstance(config, VisionConfig):
        cls = vision_tower_class(config)
    else:
        cls = {LlavaConfig: LlavaForConditionalGeneration, TextConfig: CausalLM}[type(config)]
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
    return {"input_ids": ids,
            "pixel_values": jnp.zeros((1, v.num_channels, config.input_size, config.input_size))}


def init_params(model, rng=None) -> dict:
    """Random params for ``model`` (e.g. a model built from a config to train from scratch)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return model.init(rng, **example_inputs(model.config))["params"]


def abstract_params(model) -> dict:
    """{param path: ShapeDtypeStruct} without allocating anything."""
    shapes = jax.eval_shape(lambda: init_params(model))
    return traverse_util.flatten_dict(shapes)


# ---------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------

def read_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model folder)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing (a Hugging Face model folder needs config.json)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from e


def _weight_files(path: Path) -> list:
    """The weight files of a checkpoint folder, in the order transformers prefers."""
    for single, index in ((SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path / index}: unreadable shard index ({e!r})") from e
            files = [path / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path / index} names shard files that do not exist: {missing}")
            return files
    raise CheckpointError(f"{path}: no weights found (looked for {SAFE_SINGLE}, {SAFE_INDEX}, "
                          f"{BIN_SINGLE}, {BIN_INDEX})")


def _safetensors_tensors(file: Path) -> Iterator[tuple]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="np")
    except Exception as e:  # the library raises its own error types for bad headers / sizes
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e
    with handle as f:
        for key in f.keys():
            try:
                yield key, f.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from e


def _torch_bin_tensors(file: Path) -> Iterator[tuple]:
    import torch  # only this path needs torch

    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot load PyTorch checkpoint with weights_only=True "
                              f"(corrupt, truncated or not a plain state dict): {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a state dict, got {type(state).__name__}")
    for key, t in state.items():
        if t.dtype == torch.bfloat16:
            t = t.float()  # numpy has no bfloat16; values are exact in float32
        yield key, t.numpy()


def iter_checkpoint_tensors(path) -> Iterator[tuple]:
    """Yields (file, key, numpy array) for every tensor of a checkpoint folder, lazily."""
    for file in _weight_files(Path(path)):
        reader = _safetensors_tensors if file.suffix == ".safetensors" else _torch_bin_tensors
        for key, array in reader(file):
            yield file, key, array


def _count_tensors(path: Path) -> int:
    files = _weight_files(path)
    for index in (SAFE_INDEX, BIN_INDEX):
        if (path / index).is_file():
            return len(json.loads((path / index).read_text())["weight_map"])
    if files[0].suffix == ".safetensors":
        with open(files[0], "rb") as f:
            try:
                n = int.from_bytes(f.read(8), "little")
                return len([k for k in json.loads(f.read(n)) if k != "__metadata__"])
            except (ValueError, UnicodeDecodeError):
                return 0  # the reader reports the corruption with the file name
    return 0


def _limited(items: list, n: int = 20) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_params(path, config: ModelConfig, model, dtype=jnp.float32,
                progress: Optional[bool] = None) -> dict:
    """Reads a checkpoint folder into a nested param dict matching ``model``.

    Raises CheckpointError listing missing / unexpected tensors, or naming a tensor whose shape
    disagrees with the config (both shapes given).
    """
    path = Path(path)
    original_type = read_config(path).get("model_type", "")
    targets = abstract_params(model)
    ignored = [re.compile(p) for p in _ignored_patterns(config, original_type)]
    total = _count_tensors(path)
    show = progress if progress is not None else total >= PROGRESS_MIN_TENSORS
    flat, unexpected = {}, []
    for file, key, array in tqdm(iter_checkpoint_tensors(path), total=total or None,
                                 desc=f"converting {path.name}", unit="tensor", disable=not show):
        canon = canonical_key(config, key)
        target = hf_key_to_path(canon, targets)
        if target is None:
            if not any(p.search(canon) for p in ignored):
                unexpected.append(key)
            continue
        value = to_flax(target, array)
        want = tuple(targets[target].shape)
        if tuple(value.shape) != want:
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {tuple(array.shape)} but the config needs "
                f"{tuple(to_hf(target, np.empty(want, np.int8)).shape)} (param {'/'.join(target)})")
        flat[target] = jnp.asarray(value, dtype=dtype)
    missing = ["/".join(p) + f" (HF {path_to_hf_key(p)})" for p in targets if p not in flat]
    if missing or unexpected:
        msg = [f"{path}: checkpoint does not match the {config.__class__.__name__} built from config.json"]
        if missing:
            msg.append(f"missing tensors ({len(missing)}): {_limited(missing)}")
        if unexpected:
            msg.append(f"unexpected tensors ({len(unexpected)}): {_limited(unexpected)}")
        raise CheckpointError("; ".join(msg))
    return traverse_util.unflatten_dict(flat)


def load_pretrained(path, dtype=jnp.float32, param_dtype=None, progress: Optional[bool] = None,
                    **options):
    """Loads a Hugging Face model folder. Returns (flax module, params).

    ``options`` are module fields (see :func:`build_model`); with ``scan_layers=True`` the
    params come in the scanned layout (:func:`~vitsink_jax.models.llm.stack_layers`).

    ``dtype`` is the compute dtype and, unless ``param_dtype`` is given, the dtype params are cast
    to (fp16/bf16 checkpoints are upcast or kept as asked). Dispatch on config.json's model_type:
    llava -> LVLM; clip / clip_vision_model / siglip / siglip_vision_model -> vision tower;
    llama / qwen2 -> LLM. Unknown types raise ValueError naming the type.
    """
    raw = read_config(path)
    try:
        config = config_from_hf(raw)
    except ValueError as e:
        raise type(e)(f"{Path(path) / 'config.json'}: {e}") from e
    model = build_model(config, dtype, param_dtype, **options)
    loop = model.clone(scan_layers=False) if options.get("scan_layers") else model
    params = load_params(path, config, loop, param_dtype or dtype, progress)
    return model, stack_layers(params) if loop is not model else params


# ---------------------------------------------------------------------------------------------
# Writing checkpoints
# ---------------------------------------------------------------------------------------------

_ARCHITECTURES = {"clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel",
                  "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "llava": "LlavaForConditionalGeneration"}
_WEIGHT_NAMES = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)


def hf_state_dict(params: dict) -> dict:
    """Our params (loop or scanned layout) -> {canonical HF key: numpy array in HF layout}."""
    flat = traverse_util.flatten_dict(unstack_layers(jax.device_get(params)))
    return {path_to_hf_key(p): np.ascontiguousarray(to_hf(p, np.asarray(v))) for p, v in flat.items()}


def _dtype_name(params: dict) -> str:
    dt = jax.tree_util.tree_leaves(params)[0].dtype
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(dt), "float32")


def save_pretrained(model, params: dict, out_dir, overwrite: bool = False) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` in the layout transformers loads.

    Atomic: everything is written into a temporary folder beside ``out_dir`` first, then moved in
    with ``os.replace``. An existing non-empty ``out_dir`` is refused unless ``overwrite=True``;
    then only the files written here (and weight files that would shadow them) are replaced.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: not empty; pass overwrite=True to replace the model there")
    config = model.config
    hf_cfg = config.to_hf()
    hf_cfg.setdefault("architectures", [_ARCHITECTURES[hf_cfg["model_type"]]])
    hf_cfg["dtype"] = _dtype_name(params)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tensors = hf_state_dict(params)
        save_file(tensors, str(tmp / SAFE_SINGLE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return out_dir
        out_dir.mkdir(exist_ok=True)
        for name in (SAFE_SINGLE, "config.json"):
            os.replace(tmp / name, out_dir / name)
        for stale in [out_dir / n for n in _WEIGHT_NAMES if n != SAFE_SINGLE] + \
                list(out_dir.glob("model-*-of-*.safetensors")) + list(out_dir.glob("pytorch_model-*-of-*.bin")):
            if stale.exists():
                stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def checkpoint_hash(path) -> str:
    """sha256 over config.json and the weight files of a checkpoint folder (provenance records)."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    for f in [path / "config.json"] + _weight_files(path):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


__all__ = ["CheckpointError", "load_pretrained", "save_pretrained", "build_model", "init_params",
           "abstract_params", "iter_checkpoint_tensors", "checkpoint_hash", "hf_state_dict"]
