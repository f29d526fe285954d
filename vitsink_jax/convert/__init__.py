"""Checkpoint conversion between Hugging Face PyTorch files and vitsink_jax params."""

from .checkpoint_io import (CheckpointError, checkpoint_hash, load_pretrained,  # noqa: F401
                            resolve_model_path, save_pretrained)
