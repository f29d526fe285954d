"""Image preprocessing numerically equal to transformers' PIL image processors.

CLIP (CLIPImageProcessor): resize the shortest edge (bicubic), center crop, rescale 1/255,
normalise with OpenAI's CLIP mean/std. SigLIP (SiglipImageProcessor): resize to a square
(bicubic), rescale, normalise with mean = std = 0.5. DINOv2 (BitImageProcessor): shortest edge to
256/224 of the crop, center crop, ImageNet mean/std. Output is HF's channels-first float32.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config import VisionConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[Image.Image, np.ndarray]


def load_image(path) -> Image.Image:
    """Opens an image file as RGB; raises ValueError naming the file if it cannot be decoded."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e


def to_rgb(image: ImageLike) -> Image.Image:
    """PIL image or uint8 array ([H, W], [H, W, 3] or [H, W, 4]) -> RGB PIL image."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"image array has dtype {image.dtype} and shape {image.shape}; expected "
                             "uint8 [H, W], [H, W, 3] or [H, W, 4]")
        image = Image.fromarray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _normalise(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    return ((x - mean) / std).astype(np.float32)


def preprocess_clip(image: ImageLike, size: int, crop_size: int | None = None,
                    mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """-> [3, crop, crop] float32: shortest edge to ``size``, center crop ``crop_size``."""
    image = to_rgb(image)
    crop = crop_size or size
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    return _normalise(image, mean, std)


def preprocess_siglip(image: ImageLike, size: int, mean=SIGLIP_MEAN, std=SIGLIP_STD) -> np.ndarray:
    """-> [3, size, size] float32: resize to a square (no crop)."""
    image = to_rgb(image).resize((size, size), resample=Image.BICUBIC)
    return _normalise(image, mean, std)


def preprocess_dinov2(image: ImageLike, size: int) -> np.ndarray:
    """-> [3, size, size] float32: shortest edge to size * 256 / 224, center crop ``size``."""
    return preprocess_clip(image, size * 256 // 224, size, IMAGENET_MEAN, IMAGENET_STD)


def preprocess(config: VisionConfig, images: Sequence[ImageLike], size: int = 0) -> np.ndarray:
    """Images -> pixel_values [N, 3, S, S] for the given vision tower (S = ``size`` or
    config.image_size; pass a LLaVA config's ``input_size``)."""
    fn = (preprocess_dinov2 if config.is_dinov2 else
          preprocess_clip if config.model_type == "clip_vision_model" else preprocess_siglip)
    return np.stack([fn(im, size or config.image_size) for im in images])


def pixels_from_bytes(config, raw: bytes) -> np.ndarray:
    """Encoded image bytes (a benchmark or training record) -> pixel_values [3, S, S] for a
    LLaVA config (S = its ``input_size``)."""
    with Image.open(io.BytesIO(raw)) as im:
        return preprocess(config.vision, [im.convert("RGB")], config.input_size)[0]
