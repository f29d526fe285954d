"""Flax linen models: vision towers, projector, decoder LLMs and the LVLM compositions
(LLaVA, Gemma 3, InternVL, Qwen2.5-VL). Importing the package imports every family, which
registers its config reading and module (:mod:`vitsink_jax.models.registry`); a new family adds
its import here (docs/adding_a_family.md)."""

from .gemma3 import Gemma3ForConditionalGeneration  # noqa: F401
from .internvl import InternVLForConditionalGeneration  # noqa: F401
from .llm import CausalLM  # noqa: F401
from .lvlm import LlavaForConditionalGeneration  # noqa: F401
from .projector import MLPProjector  # noqa: F401
from .qwen2_5_vl import Qwen2_5_VLForConditionalGeneration  # noqa: F401
from .dinov2 import Dinov2Tower  # noqa: F401
from .internvit import InternVisionTower  # noqa: F401
from .vit import VisionTransformer  # noqa: F401
