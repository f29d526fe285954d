"""Preprocessing equals transformers' PIL image processors on real photos."""

import dataclasses

import numpy as np
import pytest
from PIL import Image
from skimage import data
from transformers import (BitImageProcessorPil, CLIPImageProcessorPil, Gemma3ImageProcessorPil,
                          SiglipImageProcessorPil)

from vitsink_jax.data.preprocess import (CLIP_MEAN, CLIP_STD, load_image, preprocess_clip, preprocess_dinov2,
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
    from vitsink_jax.data.preprocess import pixels_from_bytes, preprocess

    image = Image.fromarray(data.astronaut()).resize(size)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    config = config_from_hf(llava_config(clip_vision_config(image_size=28, patch_size=14)).to_dict())
    hf = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    padded = llava_expand2square(image, tuple(int(x * 255) for x in CLIP_MEAN))
    want = np.asarray(hf(padded, return_tensors="np")["pixel_values"][0])
    np.testing.assert_allclose(pixels_from_bytes(config, buf.getvalue(), "pad"), want, atol=1e-5)
    assert not np.allclose(pixels_from_bytes(config, buf.getvalue()), want, atol=1e-2)
    # a padded checkpoint's images are padded in every mode (analyze, demo: preprocess)
    padded_config = dataclasses.replace(config, image_aspect_ratio="pad")
    np.testing.assert_allclose(preprocess(padded_config, [image])[0], want, atol=1e-5)
    with pytest.raises(ValueError, match="image aspect 'squash'"):
        pixels_from_bytes(config, buf.getvalue(), "squash")


# ------------------------------------------ issue 34 point 9: the folder's own processor ---

@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A tiny LLaVA (CLIP tower, 28 px) and a tiny DINOv2 tower (28 px), saved by transformers
    without preprocessor_config.json."""
    import torch
    import transformers
    from conftest import build, dinov2_config, llava_config, save

    root = tmp_path_factory.mktemp("processors")
    torch.manual_seed(0)
    dino = transformers.Dinov2Model(dinov2_config()).eval()
    return {"llava": save(build(transformers.LlavaForConditionalGeneration, llava_config()), root / "llava"),
            "dinov2": save(dino, root / "dinov2")}


def with_processor(tiny_folders, tmp_path, kind: str, settings: dict):
    """A copy of the tiny ``kind`` folder with ``settings`` as its preprocessor_config.json."""
    import json
    import shutil

    folder = shutil.copytree(tiny_folders[kind], tmp_path / kind)
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    return folder


def transformers_pixels(folder, image) -> np.ndarray:
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(folder))(image, return_tensors="np")["pixel_values"][0]


OTHER_PROCESSORS = {  # each differs from the family's default processor
    "square bilinear, own mean / std, no crop": ("llava", {
        "image_processor_type": "CLIPImageProcessor", "size": {"height": 28, "width": 28},
        "do_center_crop": False, "resample": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.25]}),
    "int sizes, shortest edge 36, no rescale or normalize": ("llava", {
        "image_processor_type": "CLIPImageProcessorFast", "size": 36, "crop_size": 28,
        "do_rescale": False, "do_normalize": False}),
    "another class: SigLIP's nearest square": ("llava", {
        "image_processor_type": "SiglipImageProcessor", "size": {"height": 28, "width": 28}, "resample": 0,
        "rescale_factor": 0.00784313725490196, "image_mean": 1.0, "image_std": 1.0, "processor_class": "X"}),
    "DINOv2 tower: shortest edge 40, crop 28, CLIP's mean": ("dinov2", {
        "image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 40},
        "crop_size": {"height": 28, "width": 28}}),
}


@pytest.mark.parametrize("case", sorted(OTHER_PROCESSORS))
def test_the_folders_preprocessor_config_is_applied_and_exported(case, tiny_folders, tmp_path):
    """A folder's preprocessor_config.json wins over the family default (it was ignored: the
    default's pixels differ), equal to transformers' AutoImageProcessor for that folder on a
    non-square photo; save_pretrained writes a file that transformers and a reload read as the
    same processing."""
    import vitsink_jax as vj
    from vitsink_jax.data.preprocess import family_processing, preprocess

    kind, settings = OTHER_PROCESSORS[case]
    folder = with_processor(tiny_folders, tmp_path, kind, settings)
    photo = Image.fromarray(data.coffee()).resize((64, 41))
    model, params = vj.load_pretrained(folder)
    ours = preprocess(model.config, [photo])[0]
    want = transformers_pixels(folder, photo)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
    default = dict(model.config.__dict__, image_processing=None)
    assert model.config.image_processing != family_processing(type(model.config)(**default))
    vj.save_pretrained(model, params, tmp_path / "export")
    np.testing.assert_allclose(transformers_pixels(tmp_path / "export", photo), want, rtol=1e-5, atol=1e-5)
    again = vj.load_pretrained(tmp_path / "export")[0].config
    assert again.image_processing == model.config.image_processing
    np.testing.assert_array_equal(preprocess(again, [photo])[0], ours)


@pytest.mark.parametrize("kind", ["llava", "dinov2"])
def test_an_export_without_a_processor_file_gets_the_family_default(kind, tiny_folders, tmp_path):
    import vitsink_jax as vj
    from vitsink_jax.data.preprocess import preprocess

    model, params = vj.load_pretrained(tiny_folders[kind])
    assert model.config.image_processing is None
    photo = Image.fromarray(data.astronaut()).resize((30, 52))
    vj.save_pretrained(model, params, tmp_path / "export")
    np.testing.assert_allclose(transformers_pixels(tmp_path / "export", photo),
                               preprocess(model.config, [photo])[0], atol=1e-5)


REFUSED = {
    "unknown key": ({"image_processor_type": "CLIPImageProcessor", "do_magic": True}, "key 'do_magic'"),
    "a value not applied": ({"do_pad": True}, r"do_pad=True is not applied here"),
    "another class's setting": ({"crop_to_patches": True}, "key 'crop_to_patches' is not a setting of CLIPImageProcessor"),
    "an unknown class": ({"image_processor_type": "ViTImageProcessor"}, "image_processor_type 'ViTImageProcessor'"),
    "another size": ({"size": 32, "crop_size": 32}, "crop_size gives 32-pixel images; the model takes 28"),
    "not square": ({"do_center_crop": False}, "do_center_crop is off and the resize keeps the image.s aspect ratio"),
    "a non-square crop": ({"crop_size": {"height": 28, "width": 20}}, "crop_size .* is not a square"),
    "two means": ({"image_mean": [0.5, 0.5]}, r"image_mean \[0.5, 0.5\] has 2 values"),
    "a cap on the longer side": ({"size": {"shortest_edge": 28, "longest_edge": 40}}, "size .* a cap on the longer side"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_processor_settings_not_applied_are_refused_by_file_and_key(case, tiny_folders, tmp_path):
    import vitsink_jax as vj
    from vitsink_jax.convert.safetensors_io import CheckpointError

    settings, message = REFUSED[case]
    folder = with_processor(tiny_folders, tmp_path, "llava", settings)
    with pytest.raises(CheckpointError, match=f"preprocessor_config.json: {message}"):
        vj.load_pretrained(folder)


@pytest.mark.parametrize("family", ["gemma3", "internvl", "qwen2_5_vl"])
def test_family_default_processor_file_round_trips(family, tmp_path):
    """The preprocessor_config.json written for Gemma 3, InternVL and Qwen2.5-VL reads back as
    the family's processing; transformers' own class for it gives the same pixels (Gemma 3,
    InternVL one tile; Qwen2.5-VL's processor returns patches, compared through our reading)."""
    import json

    import conftest
    from vitsink_jax.config import config_from_hf
    from vitsink_jax.convert.processor import FILE, processor_file_of, read_processing
    from vitsink_jax.data.preprocess import family_processing, preprocess

    config = config_from_hf(getattr(conftest, f"{family}_config")().to_dict())
    (tmp_path / FILE).write_text(json.dumps(processor_file_of(config)))
    read = read_processing(tmp_path, config).image_processing
    assert read == family_processing(config) and read.source == str(tmp_path / FILE)
    if family != "qwen2_5_vl":
        photo = Image.fromarray(data.chelsea()).resize((50, 33))
        np.testing.assert_allclose(preprocess(config, [photo])[0], transformers_pixels(tmp_path, photo), atol=1e-5)


HUB_FILES = {  # the keys of the hub's files (llava-hf/llava-1.5-7b-hf, google/gemma-3-4b-it,
    # OpenGVLab/InternVL3-1B-hf, Qwen/Qwen2.5-VL-3B-Instruct), sizes scaled to the tiny configs
    "llava": {"crop_size": {"height": 28, "width": 28}, "do_center_crop": True, "do_convert_rgb": True,
              "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
              "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD),
              "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255,
              "size": {"shortest_edge": 28}},
    "gemma3": {"do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
               "do_resize": True, "image_mean": [0.5] * 3, "image_processor_type": "Gemma3ImageProcessor",
               "image_seq_length": 4, "image_std": [0.5] * 3, "pan_and_scan_max_num_crops": None,
               "pan_and_scan_min_crop_size": None, "pan_and_scan_min_ratio_to_activate": None,
               "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 1 / 255,
               "size": {"height": 28, "width": 28}},
    "internvl": {"crop_size": None, "crop_to_patches": False, "data_format": "channels_first",
                 "default_to_square": True, "device": None, "do_center_crop": None, "do_convert_rgb": True,
                 "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
                 "image_processor_type": "GotOcr2ImageProcessorFast", "image_std": [0.229, 0.224, 0.225],
                 "input_data_format": None, "max_patches": 12, "min_patches": 1,
                 "processor_class": "InternVLProcessor", "resample": 3, "rescale_factor": 1 / 255,
                 "return_tensors": None, "size": {"height": 28, "width": 28}},
    "qwen2_5_vl": {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 4, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                   "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"},
}


@pytest.mark.parametrize("family", sorted(HUB_FILES))
def test_the_hubs_processor_files_are_read_as_the_family_default(family, tmp_path):
    """The settings the hub's own files hold (nulls, image_seq_length, the families' tiling and
    pixel-budget keys) are read, not refused, and equal the family default they spell out."""
    import json

    import conftest
    from vitsink_jax.config import config_from_hf
    from vitsink_jax.convert.processor import FILE, read_processing
    from vitsink_jax.data.preprocess import family_processing

    config = config_from_hf(getattr(conftest, f"{family}_config")().to_dict())
    (tmp_path / FILE).write_text(json.dumps(HUB_FILES[family]))
    assert read_processing(tmp_path, config).image_processing == family_processing(config)


# ------------------------------------------ issue 36 point 1: plots show the model's input ---

@pytest.mark.parametrize("aspect, photo_size", [("crop", (120, 60)), ("crop", (50, 100)), ("pad", (120, 60))])
def test_the_model_view_puts_each_patch_on_its_part_of_the_photo(aspect, photo_size, tmp_path, monkeypatch):
    """A non-square photo with one marked square: in the view the plots draw on (the photo as
    preprocessed: CLIP's shortest-edge resize and centre crop, or LLaVA's pad), the mark lies in
    the patch the box maps it to, the view normalised is the model's pixels, and the sink
    overlay outlines that patch over the mark (not where a squashed photo would put it)."""
    from conftest import clip_vision_config, llava_config
    from vitsink_jax import plots
    from vitsink_jax.config import config_from_hf
    from vitsink_jax.data.preprocess import model_view, preprocess

    config = dataclasses.replace(config_from_hf(llava_config(clip_vision_config(image_size=56, patch_size=14)).to_dict()),
                                 image_aspect_ratio=aspect)
    w, h = photo_size
    photo = np.full((h, w, 3), 90, np.uint8)
    mx, my = int(w * 0.6), int(h * 0.3)  # inside the centre crop for both shapes
    photo[my:my + 10, mx:mx + 10] = (255, 0, 0)
    seen = model_view(config, photo)
    assert seen.view.shape == (56, 56, 3)
    pixels = preprocess(config, [photo])[0]
    mean, std = np.asarray(CLIP_MEAN)[:, None, None], np.asarray(CLIP_STD)[:, None, None]
    np.testing.assert_allclose((seen.view.transpose(2, 0, 1) / 255 - mean) / std, pixels, atol=1e-5)
    left, top, right, bottom = seen.box
    vx, vy = ((mx + 5 - left) / (right - left) * 56, (my + 5 - top) / (bottom - top) * 56)
    patch = int(vy // 14) * 4 + int(vx // 14)
    r, c = divmod(patch, 4)
    red = seen.view[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14]
    assert ((red[..., 0] > 200) & (red[..., 1] < 60)).sum() >= 4  # the mark, in that patch
    if aspect == "crop" and w > h:  # the squashed photo the plots drew on put it a column off
        assert int((mx + 5) / w * 56 // 14) != c
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(
        [(p.get_x(), p.get_y()) for p in fig.axes[2].patches]))
    sink = np.zeros(16, bool)
    sink[patch] = True
    plots.sink_overlay(seen.view, sink, np.ones(16), 4, "marked", tmp_path / "x.png", photo=(photo, seen.box))
    assert drawn == [[(c * 14, r * 14)]]
