"""Scale without hardware: compile the DIYSink fine-tuning step for the LLaVA-1.5-7B / 13B shapes
on N fake CPU devices with fsdp sharding, and the inference forward with tensor parallelism, each
with the LLM layers as a Python loop and as one nn.scan (scan_layers),
nothing allocated (abstract params from jax.eval_shape), and compare XLA's per-device memory
analysis with the one-device programs. ``--plan`` instead gives the per-device memory plan of
the paper's DIYSink recipes at their real size (TinyLLaVA: SigLIP-so400m + Qwen2-0.5B / Phi-2;
LLaVA-1.5-7B stage 2) on pod slices (:data:`PLAN`).

    python benchmarks/memory.py                    # 7B and 13B shapes, 8 devices (minutes)
    python benchmarks/memory.py --quick            # a tiny shape, scanned layers (the test suite)
    python benchmarks/memory.py --plan             # the recipes on 4 to 32 chips (minutes)

Run it as its own process: it sets XLA_FLAGS for the fake devices before importing jax.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SHAPES = {  # vision: CLIP-L/336 (or SigLIP-so400m/384); text: Vicuna (LLaMA) 7B / 13B, Qwen2, Phi-2
    "llava-1.5-7b": dict(vh=1024, vl=24, vheads=16, vi=4096, image=336, patch=14,
                         th=4096, tl=32, theads=32, ti=11008, vocab=32064),
    "llava-1.5-13b": dict(vh=1024, vl=24, vheads=16, vi=4096, image=336, patch=14,
                          th=5120, tl=40, theads=40, ti=13824, vocab=32064),
    "quick": dict(vh=64, vl=2, vheads=4, vi=128, image=56, patch=14,
                  th=128, tl=2, theads=4, ti=256, vocab=512),
    # TinyLLaVA (configs/tinyllava_*.py): google/siglip-so400m-patch14-384 (all 729 patches, the
    # second-to-last layer) + Qwen/Qwen2-0.5B (GQA 14/2, tied) or microsoft/phi-2
    "tinyllava-0.5b": dict(vision="siglip_vision_model", vh=1152, vl=27, vheads=16, vi=4304,
                           image=384, patch=14, text="qwen2", th=896, tl=24, theads=14, tkv=2,
                           ti=4864, vocab=151936, tie=True),
    "tinyllava-3.1b": dict(vision="siglip_vision_model", vh=1152, vl=27, vheads=16, vi=4304,
                           image=384, patch=14, text="phi", th=2560, tl=32, theads=32, ti=10240,
                           vocab=51200, partial_rotary=0.4, act="gelu_new"),
}
SLICES = {"v4-8": (4, 32), "v5e-8": (8, 16), "v5e-16": (16, 16), "v5e-32": (32, 16),  # pod slice
          "v5p-16": (8, 95), "v4-32": (16, 32)}                         # -> (chips, GiB of HBM per chip)
# --plan: recipe -> the slices it is planned on. TinyLLaVA-0.5B on 4, 8, 16 and 32 chips at the
# same rows per chip shows how the memory per chip scales with the chips (it must not grow)
PLAN = {"tinyllava-0.5b": ("v4-8", "v5e-8", "v5e-16", "v5e-32"), "tinyllava-3.1b": ("v4-8", "v5e-16"),
        "llava-1.5-7b": ("v5p-16", "v4-32", "v5e-32")}
LLAVA_7B_ROWS_PER_CHIP = 2  # LLaVA-1.5-7B stage 2 (global batch 128 by gradient accumulation)


def llava_config(s: dict, diysink: bool = True):
    """The LlavaConfig of a SHAPES entry (with the DIYSink dual projector unless ``diysink`` is
    False)."""
    from vitsink_jax.config import DIYSinkConfig, LlavaConfig, TextConfig, VisionConfig

    vtype = s.get("vision", "clip_vision_model")
    vision = VisionConfig(model_type=vtype, hidden_size=s["vh"],
                          intermediate_size=s["vi"], num_hidden_layers=s["vl"],
                          num_attention_heads=s["vheads"], image_size=s["image"],
                          patch_size=s["patch"], hidden_act="gelu_pytorch_tanh"
                          if vtype.startswith("siglip") else "quick_gelu")
    rope = (("partial_rotary_factor", s["partial_rotary"]), ("rope_type", "default")) \
        if "partial_rotary" in s else None
    text = TextConfig(model_type=s.get("text", "llama"), vocab_size=s["vocab"], hidden_size=s["th"],
                      intermediate_size=s["ti"], num_hidden_layers=s["tl"],
                      num_attention_heads=s["theads"], num_key_value_heads=s.get("tkv", s["theads"]),
                      head_dim=s["th"] // s["theads"], max_position_embeddings=4096,
                      rope_scaling=rope, tie_word_embeddings=s.get("tie", False),
                      hidden_act=s.get("act", "silu"))
    return LlavaConfig(vision=vision, text=text, image_token_index=s["vocab"] - 1,
                       vision_feature_select_strategy="default" if vtype.startswith("clip") else "full",
                       diysink=DIYSinkConfig() if diysink else None)


def per_device_bytes(m) -> int:
    """Bytes one device holds for a compiled program: arguments + outputs + temporaries, minus
    the outputs that alias donated arguments."""
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def step_memory(name: str, devices: int, fsdp: int, batch: int, text_tokens: int,
                remat: bool = True, scan_layers: bool = False) -> dict:
    """Per-device bytes of the compiled fine-tuning step (bf16 compute, fp32 params); the LLM's
    layers as a Python loop or (``scan_layers``) one nn.scan."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from jax.sharding import NamedSharding

    from vitsink_jax import parallel, train_lib
    from vitsink_jax.convert.hf import build_model, init_params

    config = llava_config(SHAPES[name])
    model = build_model(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat,
                        scan_layers=scan_layers)
    params = jax.eval_shape(lambda: init_params(model))
    trainable, frozen = train_lib.split_params(params, train_lib.trainable_parts("finetune"))
    optim = ml_collections.ConfigDict(dict(lr=2e-5, warmup_steps=10, final_lr_ratio=0.0,
                                           weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0,
                                           grad_accum=1))
    tx, schedule = train_lib.make_optimizer(optim, 1000, "finetune", tuple(trainable))
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": trainable,
             "opt_state": jax.eval_shape(tx.init, trainable)}
    t = config.num_image_tokens + text_tokens
    v = config.vision
    batch_shapes = {"ids": ((batch, t), jnp.int32), "mask": ((batch, t), jnp.int32),
                    "loss_mask": ((batch, t), jnp.bool_), "question_mask": ((batch, t), jnp.bool_),
                    "pixels": ((batch, 3, v.image_size, v.image_size), jnp.float32)}
    batch_abs = {k: jax.ShapeDtypeStruct(*sd) for k, sd in batch_shapes.items()}
    mesh = parallel.make_mesh(fsdp, jax.devices()[:devices])
    state_sh = parallel.param_shardings(state, mesh)
    frozen_sh = parallel.param_shardings(frozen, mesh)
    batch_sh = {k: NamedSharding(mesh, parallel.BATCH) for k in batch_abs}
    step = train_lib.make_train_step(model, tx, schedule, "finetune", mesh=mesh)
    t0 = time.perf_counter()
    compiled = jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh),
                       out_shardings=(state_sh, None), donate_argnums=(0,)).lower(
        state, frozen, batch_abs).compile()
    m = compiled.memory_analysis()
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return {"shape": name, "devices": devices, "fsdp": fsdp, "batch": batch, "tokens": t, "remat": remat,
            "scan_layers": scan_layers, "params": n_params, "compile_s": time.perf_counter() - t0,
            "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
            "per_device_bytes": per_device_bytes(m)}


def forward_memory(name: str, devices: int, tensor: int, batch: int, text_tokens: int,
                   scan_layers: bool = False) -> dict:
    """Per-device bytes of the compiled inference forward (bf16 params and compute) with the
    params sharded by the tensor-parallel rules over ``tensor`` devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vitsink_jax import parallel
    from vitsink_jax.convert.hf import build_model, init_params

    config = llava_config(SHAPES[name])
    model = build_model(config, dtype=jnp.bfloat16, scan_layers=scan_layers)
    params = jax.eval_shape(lambda: init_params(model))
    mesh = parallel.make_mesh(1, jax.devices()[:devices], tensor=tensor)
    t = config.num_image_tokens + text_tokens
    v = config.vision
    ids = jax.ShapeDtypeStruct((batch, t), jnp.int32)
    pix = jax.ShapeDtypeStruct((batch, 3, v.image_size, v.image_size), jnp.bfloat16)
    rep = NamedSharding(mesh, P())
    fwd = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x).logits[:, -1],
                  in_shardings=(parallel.param_shardings(params, mesh), rep, rep))
    t0 = time.perf_counter()
    m = fwd.lower(params, ids, pix).compile().memory_analysis()
    return {"shape": name, "devices": devices, "tensor": tensor, "batch": batch, "tokens": t,
            "scan_layers": scan_layers, "compile_s": time.perf_counter() - t0, "argument_bytes": m.argument_size_in_bytes,
            "temp_bytes": m.temp_size_in_bytes,
            "per_device_bytes": per_device_bytes(m)}


def layout_memory(name: str, n: int, text_tokens: int, scan_layers: bool) -> dict:
    """One layout (loop or scanned LLM layers): the fine-tuning step on 1 device vs fsdp over
    ``n`` (batch ``n``), the inference forward on 1 device vs tensor-parallel over ``n``."""
    one = step_memory(name, 1, 1, n, text_tokens, scan_layers=scan_layers)
    sharded = step_memory(name, n, n, n, text_tokens, scan_layers=scan_layers)
    inf_one = forward_memory(name, 1, 1, 1, text_tokens, scan_layers)
    inf_tp = forward_memory(name, n, n, 1, text_tokens, scan_layers)
    return {"one_device": one, "fsdp": sharded,
            "ratio_to_ideal": sharded["per_device_bytes"] / (one["per_device_bytes"] / n),
            "inference_one_device": inf_one, "inference_tensor": inf_tp,
            "inference_ratio_to_ideal": inf_tp["per_device_bytes"] / (inf_one["per_device_bytes"] / n)}


def memory_plan(recipes: dict, max_length: int) -> list:
    """Per-device bytes of each recipe's fine-tuning step (bf16 compute, fp32 params and AdamW,
    remat, scanned layers, fsdp over every chip) on each of its pod slices (:data:`PLAN`, sizes
    in :data:`SLICES`), with ``micro`` rows per chip of ``max_length`` tokens ({recipe: micro})."""
    rows = []
    for name, micro in recipes.items():
        config = llava_config(SHAPES[name])
        text = max_length - config.num_image_tokens
        for slice_name in PLAN[name]:
            chips, hbm = SLICES[slice_name]
            r = step_memory(name, chips, chips, chips * micro, text, scan_layers=True)
            r.update(slice=slice_name, hbm_gib=hbm, micro_batch_per_chip=micro,
                     fits=r["per_device_bytes"] <= hbm * 2 ** 30)
            print(f"{name} on {slice_name} ({chips} chips x {hbm} GiB): {r['params'] / 1e9:.2f}B "
                  f"params, {micro} rows x {r['tokens']} tokens per chip: "
                  f"{r['per_device_bytes'] / 2 ** 30:.2f} GiB per chip "
                  f"({'fits' if r['fits'] else 'does not fit'}; compile {r['compile_s']:.0f} s)",
                  flush=True)
            rows.append(r)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plan", action="store_true", help="the TinyLLaVA recipes' pod-slice plan")
    ap.add_argument("--max-length", type=int, default=2048, help="--plan: tokens per row")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    devices = max(c for c, _ in SLICES.values()) if args.plan else args.devices
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}")
    from vitsink_jax.provenance import machine, package_versions, write_json

    if args.plan:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from configs.tinyllava import RECIPES
        recipes = {**{n: r["micro_batch_per_chip"] for n, r in RECIPES.items()},
                   "llava-1.5-7b": LLAVA_7B_ROWS_PER_CHIP}
        result = {"memory_plan": memory_plan(recipes, args.max_length), "versions": package_versions(),
                  "machine": machine()}
        if args.out:
            write_json(args.out, result)
        return result

    n = args.devices
    gib = lambda r, k: r[k]["per_device_bytes"] / 2 ** 30  # noqa: E731
    results = []
    for name in ["quick"] if args.quick else ["llava-1.5-7b", "llava-1.5-13b"]:
        entry = {"shape": name}
        for layout in ("scan",) if args.quick else ("loop", "scan"):
            r = entry[layout] = layout_memory(name, n, args.text_tokens, layout == "scan")
            print(f"{name}, {layout} layers: {r['one_device']['params'] / 1e9:.2f}B params; "
                  f"fine-tuning step (batch {n} x {r['one_device']['tokens']} tokens, bf16 compute, "
                  f"fp32 params + AdamW, remat) 1 device {gib(r, 'one_device'):.1f} GiB, fsdp over {n} "
                  f"{gib(r, 'fsdp'):.2f} GiB per device = {r['ratio_to_ideal']:.2f}x total/{n} "
                  f"(compile {r['fsdp']['compile_s']:.0f} s); inference forward 1 device "
                  f"{gib(r, 'inference_one_device'):.1f} GiB, tensor-parallel over {n} "
                  f"{gib(r, 'inference_tensor'):.2f} GiB per device = "
                  f"{r['inference_ratio_to_ideal']:.2f}x total/{n}", flush=True)
        results.append(entry)
    result = {"results": results, "versions": package_versions(), "machine": machine()}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
