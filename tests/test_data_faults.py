"""Faults and bad data: one bad benchmark row or training item is skipped and named at read
time (file, row / item, field), never kills a later stage, and never drops a good row."""

import base64
import io
import json

import numpy as np
from PIL import Image

from test_benchmarks import b64, png, write_tsv
from vitsink_jax.config import LlavaConfig, TextConfig, VisionConfig
from vitsink_jax.data import benchmarks as B
from vitsink_jax.data.instruct_build import InstructData, build_json
from vitsink_jax.data.preprocess import pixels_from_bytes, preprocess, to_rgb

CONFIG = LlavaConfig(vision=VisionConfig("clip_vision_model", 32, 64, 2, 4, image_size=28,
                                         patch_size=7),
                     text=TextConfig("llama", 64, 32, 64, 2, 4, 2, 8), image_token_index=63)


def jpeg(seed=0, size=32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def mc_row(index, image, answer="A") -> dict:
    return dict(index=index, question="q", A="x", B="y", answer=answer, image=image)


def test_truncated_benchmark_image_is_skipped_at_read_time(tmp_path):
    truncated = base64.b64encode(jpeg(1)[:-10]).decode()  # the header and most scans still there
    rows = [mc_row(0, b64(0)), mc_row(1, truncated), mc_row(2, base64.b64encode(jpeg(2)).decode())]
    recs, skipped = B.read_benchmark(write_tsv(tmp_path / "t.tsv", rows), "mmstar", verbose=False)
    assert [r["index"] for r in recs] == ["0", "2"]
    assert len(skipped) == 1
    assert ("t.tsv:row 2 (index 1): field 'image': does not decode as an image (OSError: image "
            "file is truncated") in skipped[0]
    for r in recs:  # scoring decodes every kept image
        assert pixels_from_bytes(CONFIG, r["image"]).shape == (3, 28, 28)


def test_image_references_resolve_against_all_rows(tmp_path):
    bad_jpeg = base64.b64encode(jpeg(3)[:-10]).decode()
    rows = [mc_row(0, b64(0), answer="E"),  # skipped (answer), its image is fine
            mc_row(1, "0"),                 # -> row 1's image
            mc_row(2, "5"),                 # forward reference -> row 5's image
            mc_row(3, "99"),                # no row has index 99
            mc_row(5, b64(5)),
            mc_row(6, bad_jpeg, answer="E"),
            mc_row(7, "6")]                 # -> a row whose image does not decode
    recs, skipped = B.read_benchmark(write_tsv(tmp_path / "ref.tsv", rows), "mmstar", verbose=False)
    assert [r["index"] for r in recs] == ["1", "2", "5"]
    assert recs[0]["image"] == png(0) and recs[1]["image"] == recs[2]["image"] == png(5)
    assert len(skipped) == 4
    assert "ref.tsv:row 1 (index 0): field 'answer'" in skipped[0]
    assert ("ref.tsv:row 4 (index 3): field 'image': '99' (not another row's index): not an "
            "existing file and not base64") in skipped[1]
    assert "row 6 (index 6): field 'answer'" in skipped[2]
    assert ("ref.tsv:row 7 (index 7): field 'image': refers to row 6 (index 6), whose image: does "
            "not decode as an image (OSError: image file is truncated") in skipped[3]


def test_image_placeholder_in_a_benchmark_text_skips_the_row(tmp_path):
    """``<image>`` in a question, hint or option would expand to a second image's tokens in the
    prompt: that row is skipped and named, its neighbours scored."""
    rows = [{**mc_row(0, b64(0)), "hint": ""}, {**mc_row(1, b64(1)), "question": "what is <image>?"},
            {**mc_row(2, b64(2)), "B": "an <image>"}, {**mc_row(3, b64(3)), "hint": "see <image>"},
            mc_row(4, b64(4))]
    recs, skipped = B.read_benchmark(write_tsv(tmp_path / "p.tsv", rows), "mmstar", verbose=False)
    assert [r["index"] for r in recs] == ["0", "4"]
    assert [s.split(": ", 1)[1] for s in skipped] == [
        "field 'question' holds the image placeholder '<image>'",
        "field 'option B' holds the image placeholder '<image>'",
        "field 'question' holds the image placeholder '<image>'"]


def test_bad_training_items_are_skipped_at_build_time(tmp_path):
    """Each bad item of an instruction file is skipped and named by file:item and id while the
    data is built; a text-only conversation is kept (LLaVA-1.5 trains on them)."""
    (tmp_path / "a.png").write_bytes(png(0))
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "cut.jpg").write_bytes(jpeg(4)[:-10])

    def item(id_, image, human="<image>\nWhat is it?"):
        out = {"id": id_, "conversations": [{"from": "human", "value": human},
                                            {"from": "gpt", "value": "A cat."}]}
        return {**out, "image": image} if image else out

    items = [item("good", "a.png"), item("two", "a.png", "<image>\n<image>\nWhat is it?"),
             item("none", "a.png", "What is it?"), item("text", "text.jpg"),
             item("cut", "cut.jpg"), item("textonly", None, "Hi?")]
    (tmp_path / "llava.json").write_text(json.dumps(items))
    manifest = build_json(tmp_path / "llava.json", None, tmp_path / "built", {}, None, workers=0,
                          verbose=False)
    data = InstructData(tmp_path / "built")
    assert [data[i]["id"] for i in range(len(data))] == ["good", "textonly"]
    assert data[0]["image"] == png(0) and data[1]["image"] == b""
    skipped = manifest["skipped"]
    assert len(skipped) == 4
    assert all(s.startswith(f"{tmp_path / 'llava.json'}:item ") for s in skipped)
    assert "item 2 (id two): 2 <image> placeholders in the conversation" in skipped[0]
    assert "item 3 (id none): 0 <image> placeholders" in skipped[1]
    assert (f"item 4 (id text): image {tmp_path / 'text.jpg'} does not decode as an image "
            "(UnidentifiedImageError") in skipped[2]
    assert "item 5 (id cut): image" in skipped[3] and "image file is truncated" in skipped[3]


def test_16_bit_grayscale_is_scaled_to_8_bits():
    ramp = np.linspace(0, 65535, 12).astype(np.uint16).reshape(3, 4)
    want = np.rint(ramp / 257).astype(np.uint8)  # v x 255 / 65535
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(to_rgb(im)), np.repeat(want[..., None], 3, -1))
    big_endian = Image.frombytes("I;16B", (4, 3), ramp.astype(">u2").tobytes())
    np.testing.assert_array_equal(np.asarray(to_rgb(big_endian))[..., 1], want)
    int32 = Image.fromarray(ramp.astype(np.int32))  # mode "I": older Pillow's 16-bit PNG
    np.testing.assert_array_equal(np.asarray(to_rgb(int32))[..., 2], want)
    # what a benchmark row or training item with this image gets: the 8-bit ramp's pixels
    np.testing.assert_array_equal(pixels_from_bytes(CONFIG, buf.getvalue()),
                                  preprocess(CONFIG.vision, [want], CONFIG.input_size)[0])
