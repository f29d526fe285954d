"""The embedded benchmark: multiple-choice items on real photos bundled with scikit-image plus
procedural overlays, tagged ``global`` or ``local`` as in the paper's Finding 5, so the whole
evaluation pipeline runs offline with known answers.

* global (scene / dominant content): "What is the main subject of this image?" - the photo's
  subject against three other subjects.
* local (small overlaid objects): "How many small red squares are in the image?" (1-4) and
  "In which corner is the small blue square?" (four corners).

Every photo gets ``variants`` different overlays (seeded); each variant yields one question of
each type. Images are stored PNG-encoded at ``size`` x ``size`` pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .prompts import LETTERS

# scikit-image photo -> its main subject (all load offline from the scikit-image wheel)
SUBJECTS = {
    "astronaut": "an astronaut", "chelsea": "a cat", "coffee": "a cup of coffee",
    "rocket": "a rocket", "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "stained cells under a microscope", "retina": "the retina of an eye",
    "stereo_motorcycle": "a motorcycle", "camera": "a man with a camera", "clock": "a clock",
    "coins": "old coins", "moon": "the surface of the moon", "page": "a page of printed text",
    "brick": "a brick wall", "grass": "grass", "colorwheel": "a colour wheel",
}
QUESTIONS = {"scene": "What is the main subject of this image?",
             "counting": "How many small red squares are in the image?",
             "position": "In which corner is the small blue square?"}
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def load_photo(name: str, size: int) -> np.ndarray:
    """[size, size, 3] uint8 RGB of a scikit-image photo (grey photos replicated to RGB)."""
    from skimage import data

    img = getattr(data, name)()
    img = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left view
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.asarray(Image.fromarray(img[..., :3]).resize((size, size), Image.BICUBIC))


def _square(img: np.ndarray, top: int, left: int, side: int, color) -> None:
    img[top:top + side, left:left + side] = color
    img[top:top + side, left:left + 1] = img[top:top + side, left + side - 1:left + side] = 255
    img[top:top + 1, left:left + side] = img[top + side - 1:top + side, left:left + side] = 255


def overlay(photo: np.ndarray, rng: np.random.Generator):
    """Draws 1-4 small red squares in the middle band and one blue square in a corner.

    Returns (image [S, S, 3] uint8, red count, corner name).
    """
    img = photo.copy()
    s = img.shape[0]
    side = max(4, s // 14)
    count = int(rng.integers(1, 5))
    cells = rng.choice(16, size=count, replace=False)  # 4x4 cells of the central half: no overlaps
    for cell in cells:
        r, c = divmod(int(cell), 4)
        _square(img, s // 4 + r * s // 8 + 2, s // 4 + c * s // 8 + 2, side, (230, 20, 20))
    corner = int(rng.integers(4))
    margin = s // 16
    top = margin if corner < 2 else s - margin - side
    left = margin if corner % 2 == 0 else s - margin - side
    _square(img, top, left, side, (20, 40, 230))
    return img, count, CORNERS[corner]


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _mc(rng, correct: str, distractors) -> tuple[list, str]:
    options = [correct] + list(distractors)
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    return options, LETTERS[options.index(correct)]


def embedded_benchmark(seed: int = 0, variants: int = 2, size: int = 224, photos=None,
                       limit: int = 0) -> list:
    """The embedded benchmark's records (see :mod:`vitsink_jax.data.benchmarks` for the schema);
    ``limit`` > 0: its first ``limit`` records only (the photos after them are not loaded)."""
    rng = np.random.default_rng(seed)
    names = list(photos or SUBJECTS)
    records = []
    for name in names:
        if limit and len(records) >= limit:
            break
        photo = load_photo(name, size)
        for v in range(variants):
            img, count, corner = overlay(photo, rng)
            image = _png(img)
            others = rng.choice([SUBJECTS[n] for n in SUBJECTS if n != name], 3, replace=False)
            questions = [
                ("global", "scene", _mc(rng, SUBJECTS[name], others)),
                ("local", "counting", _mc(rng, str(count), [str(n) for n in range(1, 5) if n != count])),
                ("local", "position", _mc(rng, corner, [c for c in CORNERS if c != corner])),
            ]
            for tag, category, (options, answer) in questions:
                records.append({"index": f"{name}-{v}-{category}", "image": image,
                                "question": QUESTIONS[category], "options": options, "answer": answer,
                                "kind": "mc", "category": category, "tag": tag, "group": name,
                                "answer_type": "text", "meta": {}})
    return records[:limit] if limit else records


def benchmark_corpus() -> list:
    """Every question and option string the generator can emit (the embedded tokenizer's text)."""
    return sorted(set(QUESTIONS.values()) | set(SUBJECTS.values()) | set(CORNERS)
                  | {str(n) for n in range(1, 5)})
