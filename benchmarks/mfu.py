"""Model FLOPs utilisation of the prefill forward and of the fine-tuning step, for a real LLaVA
shape with random weights in bf16 on one accelerator (the script to run when a GPU or TPU is
lent; the issue's target is MFU >= 45% on the 7B shape).

MFU = model FLOPs per second / the device's peak. Model FLOPs are counted from the shapes
(:func:`forward_flops`: every matmul and the attention scores / mixing, 2 FLOPs per
multiply-add; recomputation under remat is not counted, as is the convention); the training
step is the frozen ViT's forward plus 3x the projector's and LLM's. The peak is the vendor's
dense bf16 figure for known devices and otherwise a large bf16 matmul measured in the same run
(both are recorded).

    python benchmarks/mfu.py                   # LLaVA-1.5-7B shape, batch 8 (needs ~60 GB)
    python benchmarks/mfu.py --quick           # a tiny shape on any device (the test suite)
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from forward import matmul_peak, parse_args
from memory import SHAPES, llava_config
from vitsink_jax import train_lib
from vitsink_jax.convert.hf import build_model, init_params
from vitsink_jax.timing import median_seconds
from vitsink_jax.provenance import machine, package_versions, write_json

PEAK_BF16 = {  # dense bf16 FLOP/s by jax device_kind prefix (vendor data sheets)
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def forward_flops(config, batch: int, text_tokens: int) -> dict:
    """Model FLOPs of one forward: {"vision", "projector", "llm"} for ``batch`` rows of one
    image block + ``text_tokens`` text tokens (CLIP-style tower with a class token, mlp2x
    projector, LLaMA-style LLM with GQA and an untied head)."""
    v, t = config.vision, config.text
    e, p = v.hidden_size, v.patch_size
    patches = (v.image_size // p) ** 2
    n = patches + 1
    vision = 2 * patches * 3 * p * p * e + v.num_hidden_layers * (
        2 * n * (4 * e * e + 2 * e * v.intermediate_size) + 4 * n * n * e)
    d, n_img = t.hidden_size, config.num_image_tokens
    projector = 2 * n_img * (e * len(config.feature_layers) * d + d * d)
    s = n_img + text_tokens
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    llm = t.num_hidden_layers * (2 * s * (2 * d * q + 2 * d * kv + 3 * d * t.intermediate_size)
                                 + 4 * s * s * q) + 2 * s * d * t.vocab_size
    return {k: float(batch * x) for k, x in
            (("vision", vision), ("projector", projector), ("llm", llm))}


def xla_forward_flops(model, data: dict) -> float:
    """XLA's FLOP count of the lowered forward (loop layout: a scan body is counted once),
    from abstract params: the check on :func:`forward_flops`."""
    abstract = jax.eval_shape(lambda: init_params(model))
    fwd = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x).logits)
    return float(fwd.lower(abstract, data["ids"], data["pixels"]).cost_analysis()["flops"])


def device_peak(kind: str) -> float | None:
    return next((f for prefix, f in PEAK_BF16.items() if kind.startswith(prefix)), None)


def inputs(config, batch: int, text_tokens: int, seed: int = 0) -> dict:
    """A random training batch: one image block at position 4 of every row."""
    rng = np.random.default_rng(seed)
    n_img, v = config.num_image_tokens, config.vision
    t = n_img + text_tokens
    ids = rng.integers(3, config.text.vocab_size - 2, (batch, t)).astype(np.int32)
    ids[:, 4:4 + n_img] = config.image_token_index
    loss_mask = np.zeros((batch, t), bool)
    loss_mask[:, -text_tokens // 2:] = True
    return {"ids": ids, "mask": np.ones((batch, t), np.int32), "loss_mask": loss_mask,
            "question_mask": ~loss_mask & (ids != config.image_token_index),
            "pixels": rng.standard_normal((batch, 3, v.image_size, v.image_size)).astype(np.float32)}


def main(argv=None) -> dict:
    args, _, repeats = parse_args(__doc__, argv, repeats=5, shape=dict(default="llava-1.5-7b",
                                  choices=sorted(SHAPES)), batch=dict(type=int, default=8),
                                  **{"text-tokens": dict(type=int, default=64)})
    shape, batch = ("quick", 2) if args.quick else (args.shape, args.batch)
    config = llava_config(SHAPES[shape], diysink=False)
    model = build_model(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True,
                        remat=True)
    params = jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(0))
    data = {k: jnp.asarray(x) for k, x in inputs(config, batch, args.text_tokens).items()}
    data["pixels"] = data["pixels"].astype(jnp.bfloat16)

    prefill = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x).logits[:, -1])
    t_prefill = median_seconds(lambda: prefill(params, data["ids"], data["pixels"]), repeats)

    trainable, frozen = train_lib.split_params(params, train_lib.trainable_parts("finetune"))
    tx = optax.adamw(1e-5)
    state = {"step": jnp.asarray(0, jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
    step = jax.jit(train_lib.make_train_step(model, tx, {"all": optax.constant_schedule(1e-5)},
                                             "finetune"),
                   donate_argnums=(0,))

    def train_step():
        nonlocal state
        state, metrics = step(state, frozen, data)
        return metrics["loss"]  # median_seconds blocks on it

    t_train = median_seconds(train_step, repeats)  # its first call (the warm-up) compiles

    f = forward_flops(config, batch, args.text_tokens)
    fwd, train = sum(f.values()), f["vision"] + 3 * (f["projector"] + f["llm"])
    xla = xla_forward_flops(model.clone(scan_layers=False, remat=False), data)
    device = jax.devices()[0]
    measured = matmul_peak(512 if args.quick else 8192, repeats, jnp.bfloat16)
    peak = device_peak(device.device_kind) or measured
    result = {"shape": shape, "batch": batch, "tokens": config.num_image_tokens + args.text_tokens,
              "device": str(device), "device_kind": device.device_kind, "repeats": repeats,
              "dtype": "bfloat16", "scan_layers": True, "remat": True,
              "forward_flops": f, "train_step_flops": train, "xla_forward_flops": xla,
              "flops_formula_vs_xla": fwd / xla,
              "prefill_s": t_prefill, "train_step_s": t_train,
              "peak_flops_per_s": peak, "peak_source": "vendor" if peak != measured else "measured",
              "measured_bf16_matmul_flops_per_s": measured,
              "prefill_mfu": fwd / t_prefill / peak, "train_step_mfu": train / t_train / peak,
              "versions": package_versions(), "machine": machine()}
    print(f"{shape} on {device.device_kind}, batch {batch} x {result['tokens']} tokens, bf16: prefill "
          f"{t_prefill * 1e3:.1f} ms = {fwd / t_prefill / 1e12:.1f} TFLOP/s, MFU "
          f"{100 * result['prefill_mfu']:.1f}%; training step {t_train * 1e3:.1f} ms = "
          f"{train / t_train / 1e12:.1f} TFLOP/s, MFU {100 * result['train_step_mfu']:.1f}% "
          f"(peak {peak / 1e12:.0f} TFLOP/s, {result['peak_source']}; measured bf16 matmul "
          f"{measured / 1e12:.1f} TFLOP/s)")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
