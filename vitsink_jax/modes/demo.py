"""Demo mode: the library end to end on real photos.

Converts the checkpoint (default: the embedded default model, built and saved in Hugging Face
layout, then loaded back through the converter), runs the jitted LLaVA forward on each photo,
and reports per image the visual tokens with the largest feature norms - the ViT-sink
candidates of the paper's Sec. 2 (a sink is a token whose norm passes tau; 3-5 per image in
LLaVA-1.5's CLIP) - with their patch row / column, and the next-token prediction. Writes
``workdir/demo.json`` (with the first call's and the steady forward's time).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..data.preprocess import preprocess
from ..embedded import demo_prompt
from ..outputs import write_json
from ..progress import progress, write as progress_line
from .common import checkpoint_record, load_lvlm, read_images


def run_demo(cfg, workdir: Path) -> dict:
    """The checkpoint's jitted forward on each image (the bundled photos, or ``cfg.images``): per
    image the visual-token norms' mean and max, the ``cfg.top_k`` largest-norm tokens with their
    patch row / column (the ViT-sink candidates) and the next token's top 5; returns and writes
    ``demo.json`` with the first call's and the steady forward's time."""
    ckpt, model, params = load_lvlm(cfg, workdir)
    c = model.config

    @jax.jit
    def forward(params, ids, pixels):
        # the demo prompt holds no question: a ReW model reads every text token
        out = model.apply({"params": params}, ids, pixels, output_vision=True,
                          question_mask=ids != c.image_token_index)
        norms = jnp.linalg.norm(out.vision_features.astype(jnp.float32), axis=-1)  # [1, P]
        probs = jax.nn.softmax(out.logits[:, -1])
        return norms, probs

    ids = jnp.asarray(demo_prompt(c))
    images, skipped = read_images(cfg.images)
    grid = c.token_grid
    per_image, times = {}, []
    for name, image in progress(images.items(), desc="images", unit="img"):
        pixels = jnp.asarray(preprocess(c, [image]))
        t0 = time.perf_counter()
        norms, probs = jax.block_until_ready(forward(params, ids, pixels))
        times.append(time.perf_counter() - t0)
        norms, probs = np.asarray(norms[0]), np.asarray(probs[0])
        top = np.argsort(-norms)[: cfg.top_k]
        offset = c.visual_cls_offset
        per_image[name] = {
            "norm_mean": float(norms.mean()), "norm_max": float(norms.max()),
            "top_tokens": [{"index": int(i), "norm": float(norms[i]),
                            "row_col": None if i < offset else divmod(int(i) + c.patch_offset, grid)}
                           for i in top],
            "next_token_top5": [{"id": int(i), "p": float(probs[i])} for i in np.argsort(-probs)[:5]],
        }
        desc = ", ".join(f"#{t['index']}@{t['row_col']}={t['norm']:.1f}" for t in per_image[name]["top_tokens"])
        progress_line(f"{name:>12}: mean visual-token norm {norms.mean():.2f}; largest: {desc}")
    steady = times[1:] or times
    result = {**checkpoint_record(cfg, ckpt),
              "images": per_image, "skipped": skipped,
              "timing_s": {"first_call_incl_compile": times[0] if times else None,
                           "steady_forward": float(np.median(steady)) if steady else None}}
    out = write_json(workdir / "demo.json", result)
    print(f"{len(per_image)} image(s) processed, {len(skipped)} skipped; "
          f"forward {result['timing_s']['steady_forward'] or 0:.3f}s after compile; wrote {out}")
    return result
