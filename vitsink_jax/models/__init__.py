"""Flax linen models: vision towers, projector, decoder LLM and the LLaVA composition."""

from .llm import CausalLM  # noqa: F401
from .lvlm import LlavaForConditionalGeneration  # noqa: F401
from .projector import MLPProjector  # noqa: F401
from .dinov2 import Dinov2Tower  # noqa: F401
from .vit import VisionTransformer  # noqa: F401
