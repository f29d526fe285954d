"""Forward speed: vitsink_jax (jit, after warm-up) vs Hugging Face PyTorch (eager, inference_mode)
on the same medium LLaVA checkpoint and inputs, in one run, and the cost of sink detection +
sink-to-the-front on our forward. Prints the speed ratio, the overhead and the parity error;
``--out`` writes them as JSON.

    python benchmarks/forward.py            # medium config
    python benchmarks/forward.py --quick    # tiny config, one repeat (used by the test suite)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import vitsink_jax as vj
from vitsink_jax.timing import interleaved_seconds, median_seconds
from vitsink_jax.provenance import machine, package_versions, write_json

SIZES = {  # (image, patch, vision hidden/layers/heads, text hidden/layers/heads/kv, batch, text tokens)
    "medium": dict(image=224, patch=14, vh=384, vl=6, vheads=6, th=512, tl=6, theads=8, tkv=4,
                   batch=2, text=32, vocab=4096),
    "quick": dict(image=28, patch=7, vh=32, vl=2, vheads=4, th=64, tl=2, theads=4, tkv=2,
                  batch=1, text=8, vocab=128),
}


def hf_llava(s: dict):
    vision = transformers.CLIPVisionConfig(hidden_size=s["vh"], intermediate_size=4 * s["vh"],
                                           num_hidden_layers=s["vl"], num_attention_heads=s["vheads"],
                                           image_size=s["image"], patch_size=s["patch"])
    text = transformers.LlamaConfig(hidden_size=s["th"], intermediate_size=int(2.75 * s["th"]),
                                    num_hidden_layers=s["tl"], num_attention_heads=s["theads"],
                                    num_key_value_heads=s["tkv"], vocab_size=s["vocab"])
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                   image_token_index=s["vocab"] - 1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def parse_args(doc: str, argv, repeats: int = 5, **extra):
    """(args, size dict, repeats) of a benchmark CLI: --quick, --repeats, --out and ``extra``
    ({flag name: argparse kwargs})."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--out", type=Path)
    for name, kw in extra.items():
        ap.add_argument(f"--{name}", **kw)
    args = ap.parse_args(argv)
    return args, SIZES["quick" if args.quick else "medium"], 1 if args.quick else args.repeats


def llava_inputs(s: dict):
    """(HF model, our model, params, ids [B, T] with one image block, pixels) for a size dict."""
    hf = hf_llava(s)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = vj.load_pretrained(d)
    n_img = (s["image"] // s["patch"]) ** 2
    rng = np.random.default_rng(0)
    ids = rng.integers(3, s["vocab"] - 2, size=(s["batch"], s["text"] + n_img)).astype(np.int32)
    ids[:, 4:4 + n_img] = s["vocab"] - 1
    pixels = rng.standard_normal((s["batch"], 3, s["image"], s["image"])).astype(np.float32)
    return hf, model, params, ids, pixels


def matmul_peak(n: int = 2048, repeats: int = 3, dtype=jnp.float32) -> float:
    """FLOP/s of a large jnp.dot in ``dtype`` on this machine (the compute roof)."""
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / median_seconds(lambda: mm(a), repeats)  # after one warm-up call


def compiled_flops(jitted, *args) -> float:
    """FLOPs of one call, from XLA's cost analysis of the compiled program."""
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def main(argv=None) -> dict:
    args, s, repeats = parse_args(__doc__, argv)
    hf, model, params, ids, pixels = llava_inputs(s)
    n_img = model.config.num_image_tokens

    jids, jpix = jnp.asarray(ids), jnp.asarray(pixels)
    front = model.clone(visual_tokens=vj.VisualTokenPolicy("front", rule=vj.SinkRule("topk", k=4)))
    fwd, fwd_front, fwd_explicit = (jax.jit(lambda p, i, x, m=m: m.apply({"params": p}, i, x).logits)
                                    for m in (model, front, model.clone(attention_impl="explicit")))
    tids, tpix = torch.tensor(ids), torch.tensor(pixels)

    @torch.inference_mode()
    def hf_forward():
        return hf(input_ids=tids, pixel_values=tpix).logits

    ours = np.asarray(jax.block_until_ready(fwd(params, jids, jpix)))  # compile + warm-up
    ref = hf_forward().numpy()
    t = interleaved_seconds({"jax": lambda: fwd(params, jids, jpix),
                             "front": lambda: fwd_front(params, jids, jpix),
                             "explicit": lambda: fwd_explicit(params, jids, jpix), "torch": hf_forward},
                            repeats)  # the calls take turns: a slow spell hits all of them
    t_jax, t_front, t_explicit, t_torch = t["jax"], t["front"], t["explicit"], t["torch"]

    err = float(np.max(np.abs(ours - ref)))
    flops = compiled_flops(fwd, params, jids, jpix)
    peak = matmul_peak(256 if args.quick else 2048, repeats)
    result = {"config": s, "repeats": repeats, "torch_threads": torch.get_num_threads(),
              "hf_eager_s": t_torch, "vitsink_jax_jit_s": t_jax, "speedup_vs_hf": t_torch / t_jax,
              "sink_to_front_jit_s": t_front, "sink_to_front_overhead": t_front / t_jax - 1,
              "explicit_attention_jit_s": t_explicit, "fused_attention_speedup": t_explicit / t_jax,
              "forward_flops": flops, "achieved_flops_per_s": flops / t_jax,
              "matmul_peak_flops_per_s": peak, "fraction_of_matmul_peak": flops / t_jax / peak,
              "max_abs_logit_diff": err, "ref_logit_scale": float(np.max(np.abs(ref))),
              "versions": package_versions(), "machine": machine(), "device": str(jax.devices()[0])}
    print(f"LLaVA forward, batch {s['batch']} x {ids.shape[1]} tokens ({n_img} visual): "
          f"HF eager {t_torch * 1e3:.1f} ms, vitsink_jax jit {t_jax * 1e3:.1f} ms -> "
          f"{t_torch / t_jax:.2f}x; max|logit diff| {err:.2e} (logit scale {result['ref_logit_scale']:.2f}); "
          f"sink detection + sink-to-front {100 * (t_front / t_jax - 1):+.1f}%; fused attention "
          f"{t_explicit / t_jax:.2f}x over explicit; "
          f"{flops / t_jax / 1e9:.1f} GFLOP/s = {100 * flops / t_jax / peak:.0f}% of the "
          f"{peak / 1e9:.1f} GFLOP/s matmul peak")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
