"""Checkpoint layouts other than transformers' own, read into the same LLaVA params.

A layout is detected from config.json and turned into (a llava-hf config dict, weight readers
whose keys are renamed to the canonical llava-hf spelling). The load plan
(:mod:`vitsink_jax.convert.load_plan`), the sharded reads (:mod:`vitsink_jax.convert.reading`)
and every check then run unchanged, and ``save_pretrained`` writes the llava-hf layout.

* The original LLaVA codebase (liuhaotian/llava-v1.5-7b style): ``model_type`` "llava" /
  "llava_llama" / "llava_qwen" / "llava_qwen2" / "llava_phi" with ``mm_vision_tower``; the LLM's
  config at the top level, its tensors as ``model.layers.*`` / ``model.embed_tokens`` /
  ``model.norm`` / ``lm_head``, the projector as ``model.mm_projector.{0,2}.*`` (mlp2x_gelu) or
  ``model.mm_projector.*`` (linear), and the vision tower in the folder or hub id that
  ``mm_vision_tower`` names (``load_pretrained(..., vision_tower=FOLDER)`` overrides it; tower
  tensors saved in the checkpoint itself, ``model.vision_tower.vision_tower.*``, win).
  ``mm_vision_select_layer`` is the feature layer, ``mm_vision_select_feature`` "patch" drops
  the CLS token ("default"), "cls_patch" keeps it ("full"). A folder that
  :func:`write_fresh_llava` made from a base LLM and a vision tower is such a checkpoint
  without a projector: ``vitsink_fresh_projector`` (a seed) has a new one made
  (:class:`FreshProjector`), as the LLaVA-1.5 and TinyLLaVA trainers start stage 1.
* TinyLLaVA Factory (``model_type`` "tinyllava"): ``text_config`` / ``vision_config`` dicts in
  config.json (partial: transformers fills each family's defaults), tensors
  ``language_model.*`` (the LLM's own causal-LM names; Phi-2's head keeps its bias),
  ``vision_tower._vision_tower.vision_model.*`` and ``connector._connector.{0,2}.*``
  (mlp2x_gelu, exact GELU) or ``connector._connector.*`` (linear). Its "patch" selection drops
  the tower's first token, a patch for SigLIP (728 of 729 tokens, as transformers' Llava does
  with "default"); "cls_patch" keeps every token.

The LLaVA codebase marks images in ``input_ids`` with -200, outside the vocabulary; such a model
gets ``image_token_index = vocab_size`` (one past the vocabulary; the model never embeds that
id) and ``<image>`` in a prompt becomes that id (:func:`vitsink_jax.data.tokenizer.encode_marked`).
``save_pretrained`` then adds that id to the vocabulary of the llava-hf export (an embedding and
head row, the mean of the others, as transformers' own LLaVA conversion does), so transformers'
Llava runs it with the same logits over the original vocabulary.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .hf import rename_first
from .safetensors_io import CheckpointError, TensorInfo

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
    """The foreign layout of a config.json dict ("llava_codebase", "tinyllava"), or None for
    transformers'."""
    if raw.get("model_type") == "tinyllava":
        return "tinyllava"
    if "mm_vision_tower" in raw and "text_config" not in raw:
        return "llava_codebase"
    return None


def authors_system(raw: dict) -> str:
    """The system prompt (a name of :data:`vitsink_jax.data.prompts.SYSTEMS`) a checkpoint was evaluated with by its
    authors, from its config.json dict: "vicuna_v1" for the original LLaVA codebase's,
    "tinyllava" for TinyLLaVA Factory's, "" for hub LVLMs (their chat template's own turns,
    which :func:`prompt_format` renders; llava-hf's has no system prompt)."""
    return {"llava_codebase": "vicuna_v1", "tinyllava": "tinyllava"}.get(detect(raw), "")


def open_layout(path: Path, raw: dict, open_weights: Callable, vision_tower=None) -> tuple:
    """(llava-hf config dict, renamed readers) of a folder in a foreign layout."""
    if detect(raw) == "tinyllava":
        if vision_tower is not None:
            raise ValueError(f"{path}: a TinyLLaVA checkpoint holds its vision tower; vision_tower= "
                             "is for the LLaVA codebase's mm_vision_tower")
        return tinyllava(path, raw, open_weights)
    return llava_codebase(path, raw, open_weights, vision_tower)


def _past_vocabulary(text: dict) -> int:
    """The image id of these layouts: one past the vocabulary of the text config ``text`` as
    transformers resolves it (the vocab_size TextConfig reads; partial configs get the family's
    default)."""
    from ..config import hf_config

    return int(hf_config(text).vocab_size)


def _check_choice(path: Path, key: str, value, supported) -> None:
    if value not in supported:
        raise CheckpointError(f"{path / 'config.json'}: {key} {value!r} is not supported "
                              f"(supported: {', '.join(sorted(supported))})")


# LLaVA-codebase options this library does not run yet: key -> (its value when absent, whether a
# value is run, what is run). LLaVA-1.6 / OneVision's any-resolution crops ("anyres",
# "anyres_max_9") and their unpadded patch merging, <im_start> / <im_end> around the image.
_CODEBASE_NOT_RUN = {
    "image_aspect_ratio": ("square", lambda v: "anyres" not in str(v), "pad, square"),
    "mm_patch_merge_type": ("flat", lambda v: v == "flat", "flat"),
    "mm_use_im_start_end": (False, lambda v: not v, "false"),
}


def _aspect(raw: dict) -> dict:
    """The llava-hf config entry of a codebase config's ``image_aspect_ratio``: "pad" pads
    images to a square before the processor (LLaVA's ``expand2square``); "square" (the
    default) leaves them to it."""
    return {"vitsink_image_aspect_ratio": "pad"} if raw.get("image_aspect_ratio") == "pad" else {}


def _refuse_not_run(path: Path, raw: dict) -> None:
    """Raises CheckpointError naming the first key of ``_CODEBASE_NOT_RUN`` whose value in the
    config.json dict ``raw`` this library does not run."""
    for key, (default, runs, supported) in _CODEBASE_NOT_RUN.items():
        value = raw.get(key, default)
        if not runs(value):
            raise CheckpointError(f"{path / 'config.json'}: {key} {value!r} is not supported "
                                  f"(supported: {supported})")


def tinyllava(path: Path, raw: dict, open_weights: Callable) -> tuple:
    """(llava-hf config dict, renamed readers) of a TinyLLaVA Factory checkpoint."""
    for key in ("text_config", "vision_config"):
        if not isinstance(raw.get(key), dict) or "model_type" not in raw[key]:
            raise CheckpointError(f"{path / 'config.json'}: TinyLLaVA config without a {key} "
                                  "dict naming its model_type")
    connector = raw.get("connector_type", "mlp2x_gelu")
    _check_choice(path, "connector_type", connector, CODEBASE_PROJECTORS)
    feature = raw.get("vision_feature_select_strategy", "patch")
    _check_choice(path, "vision_feature_select_strategy", feature, CODEBASE_FEATURES)
    text = dict(raw["text_config"])
    vision = {k: v for k, v in raw["vision_config"].items() if not k.startswith("model_name_or_path")}
    config = {"model_type": "llava", "vision_config": vision, "text_config": text,
              "image_token_index": _past_vocabulary(text), "projector_hidden_act": "gelu",
              "vision_feature_layer": raw.get("vision_feature_layer", -2),
              "vision_feature_select_strategy": CODEBASE_FEATURES[feature],
              "vitsink_lm_head_bias": text["model_type"] == "phi", **_aspect(raw)}
    if connector != "mlp2x_gelu":
        config["projector_type"] = connector
    return config, [RenamedReader(r, partial(rename_first, rules=_TINYLLAVA_KEYS))
                     for r in open_weights(path)]


# TinyLLaVA Factory tensor names -> canonical llava-hf names (the first matching rule)
_TINYLLAVA_KEYS = ((r"^connector\._connector\.0\.", "multi_modal_projector.linear_1."),
                   (r"^connector\._connector\.2\.", "multi_modal_projector.linear_2."),
                   (r"^connector\._connector\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
                   (r"^vision_tower\._vision_tower\.vision_model\.", "vision_tower."))


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
    _refuse_not_run(path, raw)
    projector = raw.get("mm_projector_type", "linear")
    _check_choice(path, "mm_projector_type", projector, CODEBASE_PROJECTORS)
    feature = raw.get("mm_vision_select_feature", "patch")
    _check_choice(path, "mm_vision_select_feature", feature, CODEBASE_FEATURES)
    tower = find_tower(path, raw["mm_vision_tower"], "mm_vision_tower", vision_tower)
    text = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in (
        "architectures", "_name_or_path", "image_aspect_ratio", "tune_mm_mlp_adapter",
        "freeze_mm_mlp_adapter", "use_mm_proj", "image_grid_pinpoints", "unfreeze_mm_vision_tower",
        "tokenizer_padding_side", "tokenizer_model_max_length", "transformers_version",
        "vitsink_fresh_projector")}
    text["model_type"] = CODEBASE_TEXT_TYPES[mt]
    config = {"model_type": "llava", "vision_config": _read_json(tower / "config.json"),
              "text_config": text, "image_token_index": _past_vocabulary(text),
              "projector_hidden_act": "gelu",
              "vision_feature_layer": raw.get("mm_vision_select_layer", -2),
              "vision_feature_select_strategy": CODEBASE_FEATURES[feature], **_aspect(raw)}
    if projector != "mlp2x_gelu":
        config["projector_type"] = projector
    readers = [RenamedReader(r, partial(rename_first, rules=_CODEBASE_KEYS)) for r in open_weights(path)]
    if not any(k.startswith("vision_tower.") for r in readers for k in r.keys()):
        readers += [RenamedReader(r, _tower_key) for r in open_weights(tower)]
    if "vitsink_fresh_projector" in raw:
        readers.append(FreshProjector(path / "config.json", config, projector,
                                      int(raw["vitsink_fresh_projector"])))
    return config, readers


class FreshProjector:
    """A weight reader holding a new projector (canonical llava-hf names): each Linear's weight
    [out, in] and bias [out] drawn from U(-1/sqrt(in), 1/sqrt(in)), as ``torch.nn.Linear``
    initialises them in LLaVA's ``build_vision_projector`` and TinyLLaVA's connectors (numpy's
    generator seeded with ``seed``, not torch's stream). ``config``: the llava-hf config dict."""

    def __init__(self, path, config: dict, projector: str, seed: int):
        from ..config import config_from_hf

        c = config_from_hf(config)
        layers = c.vision_feature_layer
        fan_in = c.vision.hidden_size * (len(layers) if isinstance(layers, tuple) else 1)
        shapes = [("linear_1", fan_in, c.text.hidden_size)]
        if projector == "mlp2x_gelu":
            shapes.append(("linear_2", c.text.hidden_size, c.text.hidden_size))
        rng, self.path, self._arrays = np.random.default_rng(seed), path, {}
        for name, n_in, n_out in shapes:
            bound = 1.0 / np.sqrt(n_in)
            for part, shape in (("weight", (n_out, n_in)), ("bias", (n_out,))):
                self._arrays[f"multi_modal_projector.{name}.{part}"] = rng.uniform(
                    -bound, bound, shape).astype(np.float32)
        self.tensors = {k: TensorInfo("F32", a.shape, 0, a.nbytes) for k, a in self._arrays.items()}

    def keys(self) -> list:
        return list(self._arrays)

    def read(self, key: str, rows=None) -> np.ndarray:
        a = self._arrays[key]
        return a if rows is None else a[rows]


def write_fresh_llava(llm, tower, out, seed: int, projector: str = "mlp2x_gelu",
                      feature_layer: int = -2, feature: str = "patch") -> Path:
    """A LLaVA to train from a base LLM folder and a vision tower folder, as the LLaVA-1.5 and
    TinyLLaVA trainers start (the LLM and tower as released, a new connector): ``out`` gets a
    LLaVA-codebase config.json (the LLM's config, ``mm_vision_tower`` naming ``tower``, the
    projector type, feature layer and selection, ``vitsink_fresh_projector`` = ``seed``) and
    links to the LLM's weight and tokenizer files; loading it reads the LLM and the tower and
    makes the projector (:class:`FreshProjector`). The folder is made aside and moved in whole,
    replacing what ``out`` held (links of another LLM never stay). Returns ``out``."""
    llm, tower, out = Path(llm), Path(tower), Path(out)
    raw = _read_json(llm / "config.json")
    kind = {v: k for k, v in CODEBASE_TEXT_TYPES.items() if k != "llava"}.get(raw.get("model_type"))
    if kind is None:
        raise CheckpointError(f"{llm / 'config.json'}: model_type {raw.get('model_type')!r} is not a "
                              f"base LLM this can start from ({', '.join(sorted(set(CODEBASE_TEXT_TYPES.values())))})")
    if not (tower / "config.json").is_file():
        raise CheckpointError(f"{tower}: no config.json (the vision tower folder)")
    _check_choice(out, "projector", projector, CODEBASE_PROJECTORS)
    _check_choice(out, "feature", feature, CODEBASE_FEATURES)
    config = {**raw, "model_type": kind, "mm_vision_tower": str(tower.resolve()),
              "mm_projector_type": projector, "mm_vision_select_layer": feature_layer,
              "mm_vision_select_feature": feature, "vitsink_fresh_projector": seed}
    from ..provenance import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for f in llm.iterdir():
        if f.name != "config.json" and f.is_file():
            (aside / f.name).symlink_to(f.resolve())
    write_json(aside / "config.json", config)
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    aside.rename(out)
    return out


# LLaVA-codebase tensor names -> canonical llava-hf names (the first matching rule)
_CODEBASE_KEYS = ((r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
                  (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
                  (r"^model\.mm_projector\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
                  (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
                  (r"^model\.", "language_model.model."),
                  (r"^lm_head\.", "language_model.lm_head."))


def _tower_key(key: str) -> Optional[str]:
    """A vision tower folder's tensor name (CLIP / SigLIP, vision model or full) -> the
    canonical llava-hf name; the text half of a full CLIP / SigLIP is left out."""
    if _DROPPED_TOWER.search(key):
        return None
    return "vision_tower." + re.sub(r"^vision_model\.", "", key)
