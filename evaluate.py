"""vitsink_jax evaluation CLI.

    python evaluate.py                                   # demo on the embedded default, offline
    python evaluate.py --config configs/default.py --config.checkpoint=/path/to/llava --workdir runs/x

Modes (``config.mode``):
  demo  converts the checkpoint (default: the embedded default model, built and saved in HF
        layout, then loaded back through the converter), runs the jitted LLaVA forward on real
        photos, and reports per image the visual tokens with the largest feature norms (the ViT
        sink candidates) and the next-token prediction. Writes ``workdir/demo.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from tqdm.auto import tqdm

import vitsink_jax as vj
from vitsink_jax.data.preprocess import load_image, preprocess
from vitsink_jax.embedded import bundled_photos, ensure_embedded_checkpoint
from vitsink_jax.provenance import record, write_json

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Python config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where outputs are written.")

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_images(folder: str) -> tuple[dict, list]:
    """{name: PIL/array image} from a folder (or the bundled photos) and the skipped files."""
    if not folder:
        return bundled_photos(), []
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"error: image folder {root} does not exist")
    images, skipped = {}, []
    for f in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        try:
            images[f.name] = load_image(f)
        except ValueError as e:
            print(f"skipping {e}")
            skipped.append(str(f))
    return images, skipped


def demo_prompt(config: vj.LlavaConfig) -> np.ndarray:
    """[1, T] ids: a few text tokens, the image block, a few text tokens (no tokenizer needed)."""
    n = config.num_image_tokens
    return np.array([[1, 5, 6, 7] + [config.image_token_index] * n + [8, 9, 10]], np.int32)


def run_demo(cfg, workdir: Path) -> dict:
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else ensure_embedded_checkpoint(
        workdir, cfg.embedded, cfg.seed)
    print(f"checkpoint: {ckpt}" + ("" if cfg.checkpoint else
                                   "  (embedded default: seeded random weights, offline)"))
    model, params = vj.load_pretrained(ckpt, dtype=jnp.dtype(cfg.dtype), progress=True)
    if not isinstance(model, vj.LlavaForConditionalGeneration):
        raise SystemExit(f"error: {ckpt} is a {type(model).__name__}; the demo needs a llava checkpoint")
    c = model.config
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"model: {c.vision.model_type} ({c.vision.num_hidden_layers} layers) -> "
          f"{c.projector_type} -> {c.text.model_type} ({c.text.num_hidden_layers} layers), "
          f"{n_params / 1e6:.1f}M params, {c.num_image_tokens} visual tokens per image")

    @jax.jit
    def forward(params, ids, pixels):
        out = model.apply({"params": params}, ids, pixels, output_vision=True)
        norms = jnp.linalg.norm(out.vision_features.astype(jnp.float32), axis=-1)  # [1, P]
        probs = jax.nn.softmax(out.logits[:, -1])
        return norms, probs

    ids = jnp.asarray(demo_prompt(c))
    images, skipped = read_images(cfg.images)
    grid = c.vision.grid_size
    per_image, times = {}, []
    for name, image in tqdm(images.items(), desc="images", unit="img"):
        pixels = jnp.asarray(preprocess(c.vision, [image]))
        t0 = time.perf_counter()
        norms, probs = jax.block_until_ready(forward(params, ids, pixels))
        times.append(time.perf_counter() - t0)
        norms, probs = np.asarray(norms[0]), np.asarray(probs[0])
        top = np.argsort(-norms)[: cfg.top_k]
        offset = int(c.vision_feature_select_strategy == "full" and c.vision.has_class_token)
        per_image[name] = {
            "norm_mean": float(norms.mean()), "norm_max": float(norms.max()),
            "top_tokens": [{"index": int(i), "norm": float(norms[i]),
                            "row_col": None if i < offset else divmod(int(i) - offset, grid)}
                           for i in top],
            "next_token_top5": [{"id": int(i), "p": float(probs[i])} for i in np.argsort(-probs)[:5]],
        }
        desc = ", ".join(f"#{t['index']}@{t['row_col']}={t['norm']:.1f}" for t in per_image[name]["top_tokens"])
        tqdm.write(f"{name:>12}: mean visual-token norm {norms.mean():.2f}; largest: {desc}")
    steady = times[1:] or times
    result = {**record(cfg, cfg.seed, str(ckpt), vj.checkpoint_hash(ckpt)),
              "images": per_image, "skipped": skipped,
              "timing_s": {"first_call_incl_compile": times[0] if times else None,
                           "steady_forward": float(np.median(steady)) if steady else None}}
    out = write_json(workdir / "demo.json", result)
    print(f"{len(per_image)} image(s) processed, {len(skipped)} skipped; "
          f"forward {result['timing_s']['steady_forward'] or 0:.3f}s after compile; wrote {out}")
    return result


def main(argv):
    del argv
    cfg = _CONFIG.value
    workdir = Path(_WORKDIR.value)
    if cfg.mode == "demo":
        run_demo(cfg, workdir)
    else:
        raise SystemExit(f"error: unknown mode {cfg.mode!r} (available: demo)")


if __name__ == "__main__":
    app.run(main)
