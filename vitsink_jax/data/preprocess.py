"""Image preprocessing numerically equal to transformers' PIL image processors.

CLIP (CLIPImageProcessor): resize the shortest edge (bicubic), center crop, rescale 1/255,
normalise with OpenAI's CLIP mean/std. SigLIP (SiglipImageProcessor): resize to a square
(bicubic), rescale, normalise with mean = std = 0.5. DINOv2 (BitImageProcessor): shortest edge to
256/224 of the crop, center crop, ImageNet mean/std. Gemma 3 (Gemma3ImageProcessor, its SigLIP
tower): resize to a square (bilinear), mean = std = 0.5, no pan-and-scan crops (transformers'
default; not implemented). InternVL (GotOcr2ImageProcessor as InternVL's checkpoints set it:
bicubic, ImageNet mean / std): the image resized to the grid of square tiles whose aspect ratio
is closest to its own (at most ``max_tiles``), cut into those tiles, plus a thumbnail of the whole
image when there is more than one (:func:`preprocess_internvl`). Qwen2.5-VL
(Qwen2VLImageProcessor): the image at its own aspect ratio, both sides multiples of 28 pixels
(:func:`smart_resize`, bicubic, CLIP's mean / std). Output is HF's channels-first float32.
These are the family defaults (:func:`family_processing`); a checkpoint folder's own
preprocessor_config.json, carried in its config (:mod:`vitsink_jax.convert.processor`), wins
(:func:`processing_of`, applied by :func:`apply_processing`).

Encoded images are decoded in full when read (:func:`image_from_bytes`, :func:`load_image`),
so a truncated or corrupt file raises ValueError there; 16-bit grayscale is scaled to 8 bits
(:func:`to_rgb`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..config import ImageProcessing, VisionConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[Image.Image, np.ndarray]


def image_from_bytes(raw: bytes) -> Image.Image:
    """Encoded image bytes -> RGB PIL image (:func:`to_rgb`), decoded in full, so that a
    truncated or corrupt file fails here and not when its pixels are used; raises ValueError
    with PIL's error as ``"OSError: image file is truncated (..)"``."""
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return to_rgb(im)
    except Exception as e:  # noqa: BLE001  (PIL raises many types for bad data)
        raise ValueError(f"{type(e).__name__}: {e}") from e


def check_image(raw: bytes) -> None:
    """Raises ValueError (as :func:`image_from_bytes`) unless ``raw`` decodes in full. JPEGs are
    decoded at 1/8 scale (PIL's draft mode: every coded byte is still read, so truncation is
    found, at about 1/6 of the time): what a reader checks every image of a dataset with."""
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as e:  # noqa: BLE001  (PIL raises many types for bad data)
        raise ValueError(f"{type(e).__name__}: {e}") from e


def load_image(path) -> Image.Image:
    """Opens an image file as RGB (:func:`image_from_bytes`); raises ValueError naming the file
    if it cannot be read or decoded."""
    path = Path(path)
    try:
        return image_from_bytes(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from e


def to_rgb(image: ImageLike) -> Image.Image:
    """PIL image or uint8 array ([H, W], [H, W, 3] or [H, W, 4]) -> RGB PIL image. Integer
    grayscale ("I;16", "I;16B", .., and "I", which holds a 16-bit PNG in older Pillow) is taken
    as 16-bit and scaled to 8 bits first (v x 255 / 65535, rounded, clipped to [0, 255]): PIL's
    own conversion clips it, which turns a 16-bit image white. Float images ("F") are left to
    PIL (their range is not known)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"image array has dtype {image.dtype} and shape {image.shape}; expected "
                             "uint8 [H, W], [H, W, 3] or [H, W, 4]")
        image = Image.fromarray(image)
    if image.mode.startswith("I"):
        eight_bit = np.rint(np.asarray(image, np.float64) * (255 / 65535))
        image = Image.fromarray(np.clip(eight_bit, 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def _normalise(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    return ((x - mean) / std).astype(np.float32)


def shortest_edge_size(w: int, h: int, size: int) -> tuple:
    """(width, height) of a w x h image with its shorter side resized to ``size``, the longer to
    int(size x long / short) (transformers' ``shortest_edge`` resize)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def resize_shortest_edge(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """The image with its shorter side resized to ``size`` (:func:`shortest_edge_size`)."""
    return image.resize(shortest_edge_size(*image.size, size), resample=resample)


def center_crop(image: Image.Image, crop: int) -> Image.Image:
    """The centre ``crop`` x ``crop`` of the image (transformers' offsets: (side - crop) // 2)."""
    w, h = image.size
    top, left = (h - crop) // 2, (w - crop) // 2
    return image.crop((left, top, left + crop, top + crop))


def _steps(processor: str, resize: str, side: int, crop: int = 0, mean=CLIP_MEAN, std=CLIP_STD,
           resample=Image.BICUBIC) -> ImageProcessing:
    """The :class:`~vitsink_jax.config.ImageProcessing` of a processor that rescales by 1/255 and
    normalises by ``mean`` / ``std`` (every family default)."""
    return ImageProcessing(processor, resize, side, int(resample), crop, 1 / 255, True, tuple(mean), tuple(std))


def _dinov2_steps(size: int) -> ImageProcessing:
    """DINOv2's BitImageProcessor for ``size`` crops: shortest edge to size * 256 / 224 first."""
    return _steps("BitImageProcessor", "shortest_edge", size * 256 // 224, size, IMAGENET_MEAN, IMAGENET_STD)


def preprocess_clip(image: ImageLike, size: int, crop_size: int | None = None,
                    mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """-> [3, crop, crop] float32: shortest edge to ``size``, center crop ``crop_size``."""
    return apply_processing(image, _steps("CLIPImageProcessor", "shortest_edge", size, crop_size or size,
                                          mean, std))


def preprocess_siglip(image: ImageLike, size: int, mean=SIGLIP_MEAN, std=SIGLIP_STD,
                      resample=Image.BICUBIC) -> np.ndarray:
    """-> [3, size, size] float32: resize to a square (no crop)."""
    return apply_processing(image, _steps("SiglipImageProcessor", "square", size, 0, mean, std, resample))


def preprocess_gemma3(image: ImageLike, size: int) -> np.ndarray:
    """-> [3, size, size] float32: Gemma 3's square resize (bilinear), SigLIP's normalisation."""
    return preprocess_siglip(image, size, resample=Image.BILINEAR)


def tile_grid(height: int, width: int, tile: int, min_tiles: int = 1, max_tiles: int = 12) -> tuple:
    """(columns, rows) of the tile grid for an image (GotOcr2ImageProcessor's canvas): the
    arrangement of min_tiles..max_tiles tiles whose aspect ratio is closest to the image's; on a
    tie the one with more tiles while the image's area exceeds half of the grid's."""
    grids = sorted(((w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
                    if min_tiles <= w * h <= max_tiles), key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for grid in grids:
        diff = abs(width / height - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


def preprocess_internvl(image: ImageLike, size: int, max_tiles: int = 12, min_tiles: int = 1,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """-> [T, 3, size, size] float32: the image's tiles row by row (:func:`tile_grid`), then a
    thumbnail of the whole image when T > 1. Nothing is cropped away: every tile is part of the
    resized image. ``max_tiles=1``: the whole image resized to one tile."""
    image = to_rgb(image)
    cols, rows = tile_grid(image.height, image.width, size, min_tiles, max_tiles) if max_tiles > 1 else (1, 1)
    canvas = image.resize((size * cols, size * rows), resample=Image.BICUBIC)
    tiles = [canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
             for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(image.resize((size, size), resample=Image.BICUBIC))
    return np.stack([_normalise(t, mean, std) for t in tiles])


def smart_resize(height: int, width: int, unit: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple:
    """(height, width) Qwen2.5-VL's processor resizes an image to: both multiples of ``unit``
    (patch x merge pixels), the aspect ratio kept as closely as rounding allows, the area
    brought inside [min_pixels, max_pixels] (transformers' smart_resize). Raises ValueError
    naming the size for an aspect ratio over 200."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image of {height} x {width} pixels: Qwen2.5-VL takes aspect ratios up to 200")
    h, w = round(height / unit) * unit, round(width / unit) * unit
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(unit, math.floor(height / beta / unit) * unit), max(unit, math.floor(width / beta / unit) * unit)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / unit) * unit, math.ceil(width * beta / unit) * unit
    return h, w


def preprocess_qwen2_5_vl(image: ImageLike, unit: int = 28, min_pixels: int = 56 * 56,
                          max_pixels: int = 28 * 28 * 1280) -> np.ndarray:
    """-> [3, H, W] float32 at the image's own resolution (:func:`smart_resize`; bicubic, CLIP's
    mean / std), as Qwen2VLImageProcessor before it cuts patches (the model cuts them itself)."""
    image = to_rgb(image)
    h, w = smart_resize(image.height, image.width, unit, min_pixels, max_pixels)
    return _normalise(image.resize((w, h), resample=Image.BICUBIC), CLIP_MEAN, CLIP_STD)


def preprocess_dinov2(image: ImageLike, size: int) -> np.ndarray:
    """-> [3, size, size] float32: shortest edge to size * 256 / 224, center crop ``size``."""
    return apply_processing(image, _dinov2_steps(size))


def family_processing(config, size: int = 0) -> ImageProcessing:
    """The image processing a config's family uses when its folder has no
    preprocessor_config.json (module docstring), for images of side ``size`` (0: the config's
    input size): a vision tower's VisionConfig or an LVLM config (InternVL: one tile;
    Qwen2.5-VL: a square)."""
    if not isinstance(config, VisionConfig):  # an LVLM config
        size = size or config.input_size
        if config.model_type == "gemma3":
            return _steps("Gemma3ImageProcessor", "square", size, mean=SIGLIP_MEAN, std=SIGLIP_STD,
                         resample=Image.BILINEAR)
        if config.model_type == "internvl":
            return _steps("GotOcr2ImageProcessor", "square", size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if config.model_type == "qwen2_5_vl":
            return _steps("Qwen2VLImageProcessor", "square", size)
        config = config.vision
    size = size or config.image_size
    if config.is_dinov2:
        return _dinov2_steps(size)
    if config.model_type == "clip_vision_model":
        return _steps("CLIPImageProcessor", "shortest_edge", size, size)
    return _steps("SiglipImageProcessor", "square", size, mean=SIGLIP_MEAN, std=SIGLIP_STD)


def processing_of(config, size: int = 0) -> ImageProcessing:
    """The image processing of a config: its folder's preprocessor_config.json when it had one
    (``config.image_processing``), else :func:`family_processing`. ValueError when ``size``
    asks for other images than the file's."""
    steps = getattr(config, "image_processing", None)
    if steps is None:
        return family_processing(config, size)
    if size and steps.output_size and size != steps.output_size:
        raise ValueError(f"{steps.source}: gives {steps.output_size}-pixel images, not the "
                         f"{size} asked for")
    return steps


def _resized_and_cropped(image: Image.Image, steps: ImageProcessing) -> Image.Image:
    """The resize and centre crop of ``steps`` (the pixels before rescaling)."""
    if steps.resize == "shortest_edge":
        image = resize_shortest_edge(image, steps.size, steps.resample)
    elif steps.resize == "square":
        image = image.resize((steps.size, steps.size), resample=steps.resample)
    return center_crop(image, steps.crop) if steps.crop else image


def apply_processing(image: ImageLike, steps: ImageProcessing) -> np.ndarray:
    """One image -> [3, H, W] float32 by ``steps`` (:class:`~vitsink_jax.config.ImageProcessing`),
    as transformers' PIL image processor with those settings computes it."""
    x = np.asarray(_resized_and_cropped(to_rgb(image), steps), dtype=np.float32).transpose(2, 0, 1)
    if steps.rescale:
        x = x * np.float32(steps.rescale)
    if steps.normalize:
        x = (x - np.asarray(steps.mean, np.float32)[:, None, None]) / np.asarray(steps.std, np.float32)[:, None, None]
    return x.astype(np.float32)


ASPECTS = ("crop", "pad")


def preprocess(config, images: Sequence[ImageLike], size: int = 0, aspect: Optional[str] = None) -> np.ndarray:
    """Images -> pixel_values [N, 3, S, S] for a vision tower's VisionConfig or an LVLM config
    (S = ``size`` or its input size), by its image processing (:func:`processing_of`: the
    folder's preprocessor_config.json, else the family's processor). An InternVL image is one
    tile here (the whole image resized, its processor's ``crop_to_patches=False``), so batches
    keep one shape: :func:`preprocess_internvl` tiles; a Qwen2.5-VL image is resized to the
    S x S square (:func:`preprocess_qwen2_5_vl` keeps its aspect ratio). ``aspect`` "pad" first
    pads each image to a square with the processing's mean colour (:func:`expand_to_square`,
    LLaVA-1.5's stage 2); "crop" leaves it to the processor; None: the config's own
    ``image_aspect_ratio`` (a checkpoint trained with padded images is evaluated so)."""
    steps, pad = _processing_and_pad(config, size, aspect)
    return np.stack([apply_processing(_padded(im, steps, pad), steps) for im in images])


def _processing_and_pad(config, size: int, aspect: Optional[str]) -> tuple:
    """(:func:`processing_of` ``config``, whether images are padded to a square first): ``aspect``
    or the config's own ``image_aspect_ratio`` ("crop" when it has none). ValueError for an
    aspect not in :data:`ASPECTS`."""
    aspect = aspect or getattr(config, "image_aspect_ratio", "crop")
    if aspect not in ASPECTS:
        raise ValueError(f"image aspect {aspect!r} not one of {ASPECTS}")
    return processing_of(config, size), aspect == "pad"


def _padded(image: ImageLike, steps: ImageProcessing, pad: bool) -> Image.Image:
    """The RGB image, padded to a square with the processing's mean colour when ``pad``."""
    image = to_rgb(image)
    return expand_to_square(image, tuple(int(m * 255) for m in steps.mean)) if pad else image


class ModelView(NamedTuple):
    """What the model sees of a photo: ``view`` [S, S, 3] uint8, the photo resized, cropped or
    padded exactly as :func:`preprocess` does before rescaling (so patch (r, c) of a grid g
    covers rows r*S/g..(r+1)*S/g of it), and ``box`` (left, top, right, bottom): the part of the
    photo the view shows, in the photo's pixels (beyond the photo where padding was added)."""

    view: np.ndarray
    box: tuple


def model_view(config, image: ImageLike, size: int = 0, aspect: Optional[str] = None) -> ModelView:
    """The :class:`ModelView` of ``image`` for ``config`` (``size`` and ``aspect`` as in
    :func:`preprocess`): what the plots draw sink maps on."""
    steps, pad = _processing_and_pad(config, size, aspect)
    photo = to_rgb(image)
    w, h = photo.size
    photo = _padded(photo, steps, pad)
    ox, oy = (photo.width - w) // 2, (photo.height - h) // 2  # (0, 0) unless padded
    view = _resized_and_cropped(photo, steps)
    if steps.resize == "shortest_edge":
        resized = shortest_edge_size(*photo.size, steps.size)
    else:
        resized = (steps.size, steps.size) if steps.resize == "square" else photo.size
    sx, sy = resized[0] / photo.width, resized[1] / photo.height
    left, top = ((resized[0] - steps.crop) // 2, (resized[1] - steps.crop) // 2) if steps.crop else (0, 0)
    box = (left / sx - ox, top / sy - oy, (left + view.width) / sx - ox, (top + view.height) / sy - oy)
    return ModelView(np.asarray(view), box)


def expand_to_square(image: Image.Image, fill: tuple) -> Image.Image:
    """The image centred on a square canvas of its longer side filled with ``fill`` (RGB
    0-255), as LLaVA's ``expand2square`` pads before the processor (``image_aspect_ratio
    pad``): nothing of the image is cropped away."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h),) * 2, fill)
    canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def pixels_from_bytes(config, raw: bytes, aspect: Optional[str] = None) -> np.ndarray:
    """Encoded image bytes (a benchmark or training record) -> pixel_values [3, S, S] for an
    LVLM config (S = its ``input_size``; :func:`preprocess`, ``aspect`` as there)."""
    return preprocess(config, [image_from_bytes(raw)], aspect=aspect)[0]
