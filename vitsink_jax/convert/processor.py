"""A checkpoint folder's ``preprocessor_config.json`` <-> its image processing
(:class:`~vitsink_jax.config.ImageProcessing`).

Read as transformers reads it: the file's ``image_processor_type`` (its "Fast" / "Pil"
spelling included; the family's class when absent) is built with the file's settings by
transformers' own PIL image processor class, so HF's defaults and spellings (``size`` 224 ->
``shortest_edge`` or height / width, ``crop_size`` as an int, a scalar mean) resolve as they
do there. Applied: ``do_resize`` / ``size`` (``shortest_edge`` or a square height = width),
``resample``, ``do_center_crop`` / ``crop_size``, ``do_rescale`` / ``rescale_factor``,
``do_normalize`` / ``image_mean`` / ``image_std``, ``do_convert_rgb`` (images are always made RGB:
the towers take three channels). Family settings: Gemma 3's pan-and-scan must be off;
Qwen2.5-VL's ``patch_size`` / ``merge_size`` / ``temporal_patch_size`` must be its tower's (its
pixel budget ``size`` / ``min_pixels`` / ``max_pixels`` and InternVL's tiling ``crop_to_patches``
/ ``min_patches`` / ``max_patches`` belong to the aspect-keeping paths,
:func:`~vitsink_jax.data.preprocess.preprocess_qwen2_5_vl` and ``preprocess_internvl``; batches
are fixed squares). Any other key, a setting whose value is not applied (e.g. ``do_pad``), a
non-square output or one of another size than the model's input is refused naming the file and
the key (:class:`CheckpointError`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from ..config import ImageProcessing, LlavaConfig, VisionConfig
from ..data.preprocess import family_processing
from ..models.internvl import InternVLConfig
from ..models.qwen2_5_vl import Qwen2_5_VLConfig
from .safetensors_io import CheckpointError

FILE = "preprocessor_config.json"
CLASSES = ("CLIPImageProcessor", "SiglipImageProcessor", "BitImageProcessor", "Gemma3ImageProcessor",
           "GotOcr2ImageProcessor", "Qwen2VLImageProcessor")
# read and applied for every class
APPLIED = ("do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
           "rescale_factor", "do_normalize", "image_mean", "image_std", "default_to_square")
# no pixel setting: which classes wrote the file, and the image tokens of the prompt (the config's)
NAMES = ("image_processor_type", "processor_class", "image_seq_length")
# settings the file may hold with this value only (transformers' defaults; other values change
# the images in ways not applied here)
ONLY = {"do_pad": (None, False), "pad_size": (None,), "data_format": (None, "channels_first"),
        "input_data_format": (None,), "return_tensors": (None,), "device": (None,),
        "disable_grouping": (None, False, True),
        "do_pan_and_scan": (None, False), "pan_and_scan_min_crop_size": None,
        "pan_and_scan_max_num_crops": None, "pan_and_scan_min_ratio_to_activate": None,
        "crop_to_patches": None, "min_patches": None, "max_patches": None,
        "min_pixels": None, "max_pixels": None, "patch_size": None, "merge_size": None,
        "temporal_patch_size": None}
# class -> its own keys among ONLY (None there: any value, checked by the family's rule below)
FAMILY_KEYS = {"Gemma3ImageProcessor": ("do_pan_and_scan", "pan_and_scan_min_crop_size",
                                        "pan_and_scan_max_num_crops", "pan_and_scan_min_ratio_to_activate"),
               "GotOcr2ImageProcessor": ("crop_to_patches", "min_patches", "max_patches"),
               "Qwen2VLImageProcessor": ("min_pixels", "max_pixels", "patch_size", "merge_size",
                                         "temporal_patch_size")}
NO_CROP = ("Gemma3ImageProcessor", "GotOcr2ImageProcessor", "Qwen2VLImageProcessor")  # ignore do_center_crop


def processor_class(name: str, file: Path) -> str:
    """transformers' class name without its "Fast" / "Pil" suffix; CheckpointError naming the
    file unless it is one of :data:`CLASSES`."""
    base = name.removesuffix("Fast").removesuffix("Pil")
    if base not in CLASSES:
        raise CheckpointError(f"{file}: image_processor_type {name!r} is not one this library "
                              f"preprocesses as ({', '.join(CLASSES)})")
    return base


def _check_keys(d: dict, cls: str, file: Path) -> None:
    """CheckpointError naming the first key of ``d`` that is unknown, another class's, or set
    to a value not applied here."""
    for key, value in d.items():
        if key in APPLIED or key in NAMES:
            continue
        if key not in ONLY or (ONLY[key] is None and key not in FAMILY_KEYS.get(cls, ())):
            raise CheckpointError(f"{file}: key {key!r} is not a setting of {cls} this library "
                                  "applies; remove it or preprocess elsewhere")
        if ONLY[key] is not None and value not in ONLY[key]:
            raise CheckpointError(f"{file}: {key}={value!r} is not applied here (only "
                                  f"{' / '.join(map(repr, ONLY[key]))})")
    if d.get("do_pan_and_scan"):
        raise CheckpointError(f"{file}: do_pan_and_scan=True (Gemma 3's extra crops) is not run here")
    if cls in NO_CROP and d.get("do_center_crop"):
        raise CheckpointError(f"{file}: do_center_crop=True: transformers' {cls} does not crop, "
                              "so the file says two things; remove it")


def _square(size, key: str, file: Path) -> int:
    """The side of a {height, width} size dict (transformers' SizeDict) of a square; else
    CheckpointError naming the key."""
    if size.height is None or size.height != size.width:
        raise CheckpointError(f"{file}: {key} {dict(size)} is not a square height = width "
                              "(the models here take square images)")
    return int(size.height)


def _channels(value, key: str, file: Path) -> tuple:
    values = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(values) != 3:
        raise CheckpointError(f"{file}: {key} {list(values)} has {len(values)} values, not 3 (RGB)")
    return values


def _resize(p, cls: str, file: Path) -> tuple:
    """(resize, size) of a processor instance ``p``: a shortest-edge or square resize, or none."""
    if not p.do_resize:
        return "", 0
    if cls == "Qwen2VLImageProcessor":  # a pixel budget; batches take the model's square
        return "square", 0
    if p.size.longest_edge is not None or p.size.max_height is not None:
        raise CheckpointError(f"{file}: size {dict(p.size)}: a cap on the longer side is not applied "
                              "here (shortest_edge, or height = width)")
    if p.size.shortest_edge is not None and p.size.height is None:
        return "shortest_edge", int(p.size.shortest_edge)
    return "square", _square(p.size, "size", file)


def processing_from_file(d: dict, file: Path, family: str) -> ImageProcessing:
    """The :class:`ImageProcessing` of a preprocessor_config.json dict ``d`` (read from ``file``),
    whose class defaults to ``family``; CheckpointError naming the file and key for what is
    not applied here."""
    import transformers

    cls = processor_class(d.get("image_processor_type") or family, file)
    _check_keys(d, cls, file)
    settings = {k: v for k, v in d.items() if k not in NAMES}
    try:
        p = getattr(transformers, cls + "Pil")(**settings)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: transformers' {cls} refuses its settings ({e})") from e
    resize, size = _resize(p, cls, file)
    crop = _square(p.crop_size, "crop_size", file) if getattr(p, "do_center_crop", False) and cls not in NO_CROP else 0
    return ImageProcessing(cls, resize, size, int(p.resample), crop,
                           float(p.rescale_factor) if p.do_rescale else 0.0, bool(p.do_normalize),
                           _channels(p.image_mean, "image_mean", file),
                           _channels(p.image_std, "image_std", file), str(file))


def _fit(steps: ImageProcessing, config, file: Path) -> ImageProcessing:
    """``steps`` for ``config`` (a Qwen2.5-VL resize: the model's square); the images must be
    squares of the model's input size (else CheckpointError naming the key)."""
    side = config.image_size if isinstance(config, VisionConfig) else config.input_size
    if isinstance(config, Qwen2_5_VLConfig) and steps.resize:
        steps = dataclasses.replace(steps, size=side)
    if not steps.output_size:
        raise CheckpointError(f"{file}: do_center_crop is off and the resize keeps the image's "
                              "aspect ratio, so images are not square (the models here take squares)")
    if steps.output_size != side:
        key = "crop_size" if steps.crop else "size"
        raise CheckpointError(f"{file}: {key} gives {steps.output_size}-pixel images; the model takes "
                              f"{side} (its vision tower's image_size)")
    return steps


def _check_qwen_patches(d: dict, config, file: Path) -> None:
    v = config.vision
    for key, ours in (("patch_size", v.patch_size), ("merge_size", v.spatial_merge_size),
                      ("temporal_patch_size", v.temporal_patch_size)):
        if key in d and d[key] != ours:
            raise CheckpointError(f"{file}: {key} {d[key]} is not the vision tower's {ours}")


def read_processing(folder: Path, config):
    """``config`` with the image processing of ``folder``'s preprocessor_config.json
    (unchanged without one; a text-only config is returned as it is)."""
    file = Path(folder) / FILE
    if not file.is_file() or not isinstance(config, (VisionConfig, LlavaConfig)):
        return config
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: holds a {type(d).__name__}, not a JSON object")
    if isinstance(config, Qwen2_5_VLConfig):
        _check_qwen_patches(d, config, file)
    steps = _fit(processing_from_file(d, file, family_processing(config).processor), config, file)
    return dataclasses.replace(config, image_processing=steps)


def processing_json(steps: ImageProcessing, config) -> dict:
    """The preprocessor_config.json that transformers' ``steps.processor`` class reads back as
    ``steps`` (and :func:`read_processing` too)."""
    d = {"image_processor_type": steps.processor, "do_convert_rgb": True, "do_resize": bool(steps.resize),
         "resample": steps.resample, "do_rescale": bool(steps.rescale),
         "rescale_factor": steps.rescale or 1 / 255, "do_normalize": steps.normalize,
         "image_mean": list(steps.mean), "image_std": list(steps.std)}
    if steps.processor == "Qwen2VLImageProcessor":
        v = config.vision
        return {**d, "patch_size": v.patch_size, "merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size}
    if steps.resize:
        side = steps.size
        d["size"] = {"shortest_edge": side} if steps.resize == "shortest_edge" else {"height": side, "width": side}
    if steps.processor not in NO_CROP:
        d["do_center_crop"] = bool(steps.crop)
        if steps.crop:
            d["crop_size"] = {"height": steps.crop, "width": steps.crop}
    if isinstance(config, InternVLConfig):
        d["crop_to_patches"] = False
    return d


def processor_file_of(config) -> Optional[dict]:
    """The preprocessor_config.json dict ``save_pretrained`` writes for ``config``: its image
    processing (the file it was read from, else the family's), None for a text-only model."""
    from ..data.preprocess import processing_of

    if not isinstance(config, (VisionConfig, LlavaConfig)):
        return None
    return processing_json(processing_of(config), config)
