"""Checkpoint layouts other than transformers' own, read into the same LLaVA params.

A layout is detected from config.json and turned into (a llava-hf config dict, weight readers
whose keys are renamed to the canonical llava-hf spelling). The load plan, the sharded reads and
every check of :mod:`vitsink_jax.convert.checkpoint_io` then run unchanged, and
``save_pretrained`` writes the llava-hf layout.

* The original LLaVA codebase (liuhaotian/llava-v1.5-7b style): ``model_type`` "llava" /
  "llava_llama" / "llava_qwen" / "llava_qwen2" / "llava_phi" with ``mm_vision_tower``; the LLM's
  config at the top level, its tensors as ``model.layers.*`` / ``model.embed_tokens`` /
  ``model.norm`` / ``lm_head``, the projector as ``model.mm_projector.{0,2}.*`` (mlp2x_gelu) or
  ``model.mm_projector.*`` (linear), and the vision tower in the folder or hub id that
  ``mm_vision_tower`` names (``load_pretrained(..., vision_tower=FOLDER)`` overrides it; tower
  tensors saved in the checkpoint itself, ``model.vision_tower.vision_tower.*``, win).
  ``mm_vision_select_layer`` is the feature layer, ``mm_vision_select_feature`` "patch" drops
  the CLS token ("default"), "cls_patch" keeps it ("full").

The LLaVA codebase marks images in ``input_ids`` with -200, outside the vocabulary; such a model
gets ``image_token_index = vocab_size`` (one past the vocabulary; the model never embeds that
id) and ``<image>`` in a prompt becomes that id (:func:`vitsink_jax.data.tokenizer.encode_marked`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

from .safetensors_io import CheckpointError

CODEBASE_TEXT_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_qwen": "qwen2",
                       "llava_qwen2": "qwen2", "llava_phi": "phi", "llava_phi3": "phi3"}
CODEBASE_PROJECTORS = ("mlp2x_gelu", "linear")
CODEBASE_FEATURES = {"patch": "default", "cls_patch": "full"}
_DROPPED_TOWER = re.compile(r"^(text_model\.|logit_scale$|logit_bias$|visual_projection\.|text_projection\.)")


class RenamedReader:
    """A weight reader (safetensors or .bin) whose keys are renamed by ``rename(key)`` (None:
    the tensor is left out); the reader interface load_plan reads (path, keys, tensors, read)."""

    def __init__(self, reader, rename: Callable[[str], Optional[str]]):
        self.path, self._reader, self._names = reader.path, reader, {}
        for key in reader.keys():
            new = rename(key)
            if new is not None:
                self._names[new] = key
        self.tensors = {new: reader.tensors[old] for new, old in self._names.items()}

    def keys(self) -> list:
        return list(self._names)

    def read(self, key: str, rows=None):
        return self._reader.read(self._names[key], rows)


def detect(raw: dict) -> Optional[str]:
    """The foreign layout of a config.json dict ("llava_codebase"), or None for transformers'."""
    if "mm_vision_tower" in raw and "text_config" not in raw:
        return "llava_codebase"
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def find_tower(path: Path, name: str, key: str, override=None) -> Path:
    """The vision tower folder a checkpoint names (``key`` = ``name``): ``override`` when given,
    else ``name`` as a folder (as given, then relative to the checkpoint), else a Hugging Face
    repo id in the local hub cache. Raises CheckpointError naming the key and the paths tried."""
    candidates = [Path(override)] if override is not None else [Path(name), path / name]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    tried = [str(c) for c in candidates]
    if override is None and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        try:
            return Path(snapshot_download(name, local_files_only=True))
        except LocalEntryNotFoundError:
            tried.append(f"{name} in the huggingface_hub cache {constants.HF_HUB_CACHE}")
    raise CheckpointError(f"{path / 'config.json'}: the vision tower {key}={name!r} was not found "
                          f"(tried {', '.join(tried)}); pass load_pretrained(..., "
                          f"vision_tower=FOLDER) with a folder holding its config.json and weights")


def llava_codebase(path: Path, raw: dict, open_weights: Callable, vision_tower=None) -> tuple:
    """(llava-hf config dict, renamed readers) of an original-LLaVA-codebase checkpoint."""
    mt = raw.get("model_type")
    if mt not in CODEBASE_TEXT_TYPES:
        raise CheckpointError(f"{path / 'config.json'}: LLaVA-codebase model_type {mt!r} not one of "
                              f"{sorted(CODEBASE_TEXT_TYPES)}")
    projector = raw.get("mm_projector_type", "linear")
    if projector not in CODEBASE_PROJECTORS:
        raise CheckpointError(f"{path / 'config.json'}: mm_projector_type {projector!r} is not "
                              f"supported (supported: {', '.join(CODEBASE_PROJECTORS)})")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in CODEBASE_FEATURES:
        raise CheckpointError(f"{path / 'config.json'}: mm_vision_select_feature {feature!r} not "
                              f"one of {sorted(CODEBASE_FEATURES)}")
    tower = find_tower(path, raw["mm_vision_tower"], "mm_vision_tower", vision_tower)
    text = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in (
        "architectures", "_name_or_path", "image_aspect_ratio", "tune_mm_mlp_adapter",
        "freeze_mm_mlp_adapter", "use_mm_proj", "image_grid_pinpoints", "unfreeze_mm_vision_tower",
        "tokenizer_padding_side", "tokenizer_model_max_length", "transformers_version")}
    text["model_type"] = CODEBASE_TEXT_TYPES[mt]
    config = {"model_type": "llava", "vision_config": _read_json(tower / "config.json"),
              "text_config": text, "image_token_index": int(raw["vocab_size"]),
              "projector_hidden_act": "gelu",
              "vision_feature_layer": raw.get("mm_vision_select_layer", -2),
              "vision_feature_select_strategy": CODEBASE_FEATURES[feature]}
    if projector != "mlp2x_gelu":
        config["projector_type"] = projector
    readers = [RenamedReader(r, _codebase_key) for r in open_weights(path)]
    if not any(k.startswith("vision_tower.") for r in readers for k in r.keys()):
        readers += [RenamedReader(r, _tower_key) for r in open_weights(tower)]
    return config, readers


def _codebase_key(key: str) -> Optional[str]:
    """A LLaVA-codebase tensor name -> its canonical llava-hf name."""
    for pattern, repl in ((r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
                          (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
                          (r"^model\.mm_projector\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
                          (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
                          (r"^model\.", "language_model.model."),
                          (r"^lm_head\.", "language_model.lm_head.")):
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _tower_key(key: str) -> Optional[str]:
    """A vision tower folder's tensor name (CLIP / SigLIP, vision model or full) -> the
    canonical llava-hf name; the text half of a full CLIP / SigLIP is left out."""
    if _DROPPED_TOWER.search(key):
        return None
    return "vision_tower." + re.sub(r"^vision_model\.", "", key)
