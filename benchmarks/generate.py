"""Decode speed: vitsink_jax KV-cache generation (prefill + compiled decode loop) vs Hugging Face
``generate`` (PyTorch, KV cache, inference_mode) on the same medium LLaVA, prompt and length,
greedy, in one run. Reports new tokens per second for each, the ratio, and whether the tokens
agree, and the decode step against the memory roof (a streaming read) and against the
matmul floor (the same weight matmuls alone in a compiled loop); ``--out`` writes JSON.

    python benchmarks/generate.py            # medium config, 32 new tokens
    python benchmarks/generate.py --quick    # tiny config (used by the test suite)
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
import torch

from forward import llava_inputs, parse_args
from vitsink_jax.timing import interleaved_seconds, median_seconds
from vitsink_jax.generate import generate
from vitsink_jax.provenance import machine, package_versions, write_json


def stream_bandwidth(n_bytes: int, repeats: int = 3) -> float:
    """Bytes/s of reading a large fp32 array once (a jitted sum): the memory roof."""
    x = jax.numpy.ones((n_bytes // 4,), jax.numpy.float32)
    total = jax.jit(lambda a: a.sum())
    return n_bytes / median_seconds(lambda: total(x), repeats)  # after one warm-up call


def matmul_floor(mats: list, batch: int, repeats: int = 3, steps: int = 8) -> float:
    """Seconds per pass of a compiled loop that multiplies a [batch, in] block by each matrix
    of ``mats`` once and does nothing else: what XLA's matmul reaches reading these weights
    here (a decode step's floor; each pass depends on the last so none is skipped)."""
    def one_pass(_, acc):
        return acc + sum((jax.numpy.broadcast_to(acc, (batch, w.shape[0])) @ w)[:, :1] for w in mats)
    loop = jax.jit(lambda ms, x: jax.lax.fori_loop(0, steps, lambda i, a: one_pass(i, a), x))
    x = jax.numpy.zeros((batch, 1), jax.numpy.float32)
    return median_seconds(lambda: loop(mats, x), repeats) / steps  # after one warm-up call


def main(argv=None) -> dict:
    args, s, repeats = parse_args(__doc__, argv, repeats=3, **{"new-tokens": dict(type=int, default=32)})
    n_new = 8 if args.quick else args.new_tokens
    hf, model, params, ids, pixels = llava_inputs(s)
    n_img = model.config.num_image_tokens
    mask = np.ones_like(ids)

    def ours(n):
        return lambda: generate(model, params, ids, mask, pixels, n)

    kw = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
              pixel_values=torch.tensor(pixels), do_sample=False, pad_token_id=0)

    def theirs(n):
        return torch.inference_mode()(lambda: hf.generate(**kw, max_new_tokens=n, min_new_tokens=n))

    t0 = time.perf_counter()
    got = np.asarray(jax.block_until_ready(ours(n_new)()))
    compile_s = time.perf_counter() - t0
    ref = theirs(n_new)()[:, ids.shape[1]:].numpy()
    # decode alone: the time of n_new tokens minus the time of 1 (prefill + first token); the
    # four calls take turns so that a slow spell of the machine hits all of them
    t = interleaved_seconds({"jax": ours(n_new), "jax_one": ours(1), "torch": theirs(n_new),
                             "torch_one": theirs(1)}, repeats)
    t_jax, t_torch = t["jax"], t["torch"]
    decode_step = (t_jax - t["jax_one"]) / (n_new - 1)
    hf_one = t["torch_one"]
    hf_step = (t_torch - hf_one) / (n_new - 1)
    c = model.config.text
    lm = params["language_model"]  # every weight is read once per step but the embedding table
    if not c.tie_word_embeddings:  # (one row per token) unless it doubles as the LM head
        lm = {**lm, "model": {k: v for k, v in lm["model"].items() if k != "embed_tokens"}}
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(lm))
    floor = matmul_floor([w for w in jax.tree_util.tree_leaves(lm) if w.ndim == 2], s["batch"], repeats)
    cache_bytes = (2 * c.num_hidden_layers * s["batch"] * (ids.shape[1] + n_new)
                   * c.num_key_value_heads * c.head_dim * 4)
    bandwidth = stream_bandwidth(1 << 24 if args.quick else 1 << 29, repeats)
    new = s["batch"] * n_new
    result = {"config": s, "new_tokens": n_new, "repeats": repeats,
              "torch_threads": torch.get_num_threads(), "hf_generate_s": t_torch,
              "vitsink_jax_generate_s": t_jax, "compile_s": compile_s,
              "hf_tokens_per_s": new / t_torch, "vitsink_jax_tokens_per_s": new / t_jax,
              "speedup_vs_hf": t_torch / t_jax, "tokens_equal": bool(np.array_equal(got, ref)),
              "decode_step_s": decode_step, "hf_decode_step_s": hf_step,
              "decode_speedup_vs_hf": hf_step / decode_step,
              "bytes_per_decode_step": weight_bytes + cache_bytes,
              "stream_bandwidth_bytes_per_s": bandwidth,
              "fraction_of_bandwidth": (weight_bytes + cache_bytes) / decode_step / bandwidth,
              "matmul_floor_s": floor, "fraction_of_matmul_floor": floor / decode_step,
              "matmul_floor_fraction_of_bandwidth": weight_bytes / floor / bandwidth,
              "versions": package_versions(), "machine": machine(), "device": str(jax.devices()[0])}
    print(f"greedy generation, batch {s['batch']}, prompt {ids.shape[1]} tokens ({n_img} visual), "
          f"{n_new} new: HF generate {t_torch * 1e3:.0f} ms ({new / t_torch:.1f} tok/s), "
          f"vitsink_jax {t_jax * 1e3:.0f} ms ({new / t_jax:.1f} tok/s) -> {t_torch / t_jax:.2f}x; "
          f"tokens equal: {result['tokens_equal']} (first call incl. compile {compile_s:.1f} s); "
          f"decode step {decode_step * 1e3:.2f} ms vs HF {hf_step * 1e3:.2f} ms -> "
          f"{hf_step / decode_step:.2f}x; {(weight_bytes + cache_bytes) / decode_step / 1e9:.1f} GB/s "
          f"= {100 * result['fraction_of_bandwidth']:.0f}% of the {bandwidth / 1e9:.1f} GB/s stream; "
          f"the same matmuls alone take {floor * 1e3:.2f} ms ("
          f"{100 * result['matmul_floor_fraction_of_bandwidth']:.0f}% of the stream): the step runs at "
          f"{100 * result['fraction_of_matmul_floor']:.0f}% of that floor")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
