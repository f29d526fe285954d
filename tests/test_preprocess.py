"""Preprocessing equals transformers' PIL image processors on real photos."""

import numpy as np
import pytest
from PIL import Image
from skimage import data
from transformers import (BitImageProcessorPil, CLIPImageProcessorPil, Gemma3ImageProcessorPil,
                          SiglipImageProcessorPil)

from vitsink_jax.data.preprocess import (load_image, preprocess_clip, preprocess_dinov2,
                                         preprocess_gemma3, preprocess_siglip)

PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "camera": data.camera}


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_clip_matches_hf(name):
    img = PHOTOS[name]()
    hf = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    ref = hf(images=Image.fromarray(img), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess_clip(img, 56), ref, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_siglip_matches_hf(name):
    img = PHOTOS[name]()
    ref = SiglipImageProcessorPil(size={"height": 48, "width": 48})(images=Image.fromarray(img), return_tensors="np")
    np.testing.assert_allclose(preprocess_siglip(img, 48), ref["pixel_values"][0], atol=1e-5)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_gemma3_matches_hf(name):
    """Gemma3ImageProcessor's defaults (no pan-and-scan): a bilinear square resize of any
    aspect ratio, never a crop."""
    img = PHOTOS[name]()
    ref = Gemma3ImageProcessorPil(size={"height": 48, "width": 48})(images=Image.fromarray(img), return_tensors="np")
    np.testing.assert_allclose(preprocess_gemma3(img, 48), ref["pixel_values"][0], atol=1e-5)


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_dinov2_matches_hf(name):
    img = PHOTOS[name]()
    hf = BitImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                              image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    ref = hf(images=Image.fromarray(img), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess_dinov2(img, 56), ref, atol=1e-5)


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg: cannot read image"):
        load_image(bad)
    with pytest.raises(ValueError, match="dtype float64"):
        preprocess_clip(np.zeros((8, 8, 3)), 8)


def llava_expand2square(pil_img, background_color):
    """LLaVA's ``expand2square`` (llava/train/train.py, llava/mm_utils.py), restated."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


@pytest.mark.parametrize("size", [(40, 20), (20, 41)])
def test_pad_to_square_is_llavas_expand2square(size):
    """``image_aspect_ratio pad`` (LLaVA-1.5's stage 2): the image padded to a square with the
    processor's mean colour, then the CLIP processor; unlike the centre crop it keeps every
    pixel of a non-square image (the crop's pixels differ)."""
    import io

    from conftest import clip_vision_config, llava_config
    from vitsink_jax.config import config_from_hf
    from vitsink_jax.data.preprocess import CLIP_MEAN, pixels_from_bytes

    image = Image.fromarray(data.astronaut()).resize(size)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    config = config_from_hf(llava_config(clip_vision_config(image_size=28, patch_size=14)).to_dict())
    hf = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    padded = llava_expand2square(image, tuple(int(x * 255) for x in CLIP_MEAN))
    want = np.asarray(hf(padded, return_tensors="np")["pixel_values"][0])
    np.testing.assert_allclose(pixels_from_bytes(config, buf.getvalue(), "pad"), want, atol=1e-5)
    assert not np.allclose(pixels_from_bytes(config, buf.getvalue()), want, atol=1e-2)
    with pytest.raises(ValueError, match="image aspect 'squash'"):
        pixels_from_bytes(config, buf.getvalue(), "squash")
