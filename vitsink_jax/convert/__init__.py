"""Checkpoint conversion between Hugging Face PyTorch files and vitsink_jax params."""

from .hf import CheckpointError, checkpoint_hash, load_pretrained, save_pretrained  # noqa: F401
