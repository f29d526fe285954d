"""Token pruning speed: prefill forward and one cached decode step of a medium LLaVA with FastV
pruning (and its sink-aware variant) against the stock model, in one run on the same batch.
The pruned layers run on fewer tokens and keep a shorter KV cache, so both should get faster;
the ratios say by how much on this machine. Random weights (speed does not depend on them).

    python benchmarks/pruning.py            # medium config (6-layer 512-wide LLM, 256 visual tokens)
    python benchmarks/pruning.py --quick    # tiny config (used by the test suite)
"""

from __future__ import annotations

import sys

import numpy as np

import vitsink_jax as vj
from forward import llava_inputs, parse_args
from vitsink_jax import timing
from vitsink_jax.data.padding import left_pad
from vitsink_jax.interventions import parse
from vitsink_jax.provenance import machine, package_versions, write_json

SPECS = ("stock", "fastv:0.5:2", "fastv:0.75:2", "fastv+sinks:0.5:2", "fastv+sinks:0.75:2")


def main(argv=None) -> dict:
    args, s, repeats = parse_args(__doc__, argv)
    _, model, params, ids, pixels = llava_inputs(s)
    n_img = model.config.num_image_tokens
    batch = {"ids": ids, "mask": np.ones_like(ids), "pixels": pixels}
    batch["left_ids"], batch["left_mask"] = left_pad(list(ids), ids.shape[1])
    rule = vj.SinkRule("topk", k=4)
    rows, calls, steps = {}, {}, 8
    for spec in SPECS if not args.quick else [x.replace(":2", ":1") for x in SPECS[:2]]:
        iv, _, _ = parse(spec)  # quick: a 2-layer LLM, so pruning after layer 1
        m = model.clone(visual_tokens=vj.VisualTokenPolicy(rule=rule), interventions=iv)
        rows[spec] = {"visual_tokens_kept": iv.tokens_kept(n_img)}
        calls[spec, "prefill_s"] = timing.prefill_call(m, params, batch)
        calls[spec, "decode_step_s"] = timing.decode_call(m, params, batch, steps)
    # every variant's calls take turns, so a slow spell of the machine hits them all alike
    for (spec, what), t in timing.interleaved_seconds(calls, repeats).items():
        rows[spec][what] = t / (steps if what == "decode_step_s" else 1)
    ref = rows["stock"]
    for spec, r in rows.items():
        r["prefill_speedup"] = ref["prefill_s"] / r["prefill_s"]
        r["decode_speedup"] = ref["decode_step_s"] / r["decode_step_s"]
        print(f"{spec:>20}: {r['visual_tokens_kept']:4d} visual tokens, prefill "
              f"{r['prefill_s'] * 1e3:7.1f} ms ({r['prefill_speedup']:.2f}x), decode step "
              f"{r['decode_step_s'] * 1e3:6.2f} ms ({r['decode_speedup']:.2f}x)")
    result = {"config": s, "repeats": repeats, "results": rows, "versions": package_versions(), "machine": machine()}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
