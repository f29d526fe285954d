"""Which module runs which vision tower. Each tower's file registers its class here
(:func:`tower`), so the LVLM and the converter look a tower up by its config
(:func:`vision_tower_class`) without importing the towers' files: no file of models/ imports
another family's. The package's ``__init__`` imports every family, so all are registered before
any lookup.
"""

from __future__ import annotations

_TOWERS: dict = {}


def tower_kind(config) -> str:
    """The registry key of a VisionConfig: "internvit", "qwen2_5_vl", "dinov2" (with or without
    registers) or "vit" (CLIP / SigLIP)."""
    if config.is_internvit:
        return "internvit"
    if config.model_type == "qwen2_5_vl_vision":
        return "qwen2_5_vl"
    return "dinov2" if config.is_dinov2 else "vit"


def tower(kind: str):
    """Class decorator: registers a tower module as the one for ``kind`` (:func:`tower_kind`)."""
    def register(cls):
        _TOWERS[kind] = cls
        return cls
    return register


def vision_tower_class(config):
    """The tower module class for a VisionConfig (:func:`tower_kind`)."""
    return _TOWERS[tower_kind(config)]
