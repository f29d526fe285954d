"""Checkpoint conversion between Hugging Face PyTorch files and vitsink_jax params."""

from .folders import resolve_model_path  # noqa: F401
from .reading import load_pretrained  # noqa: F401
from .safetensors_io import CheckpointError  # noqa: F401
from .writing import checkpoint_hash, save_pretrained  # noqa: F401
