"""Training loss in bf16 compute vs fp32 on the medium LLaVA: the same params (float32, as the
trained parts are in train.py), batch and answer tokens, the loss of
:func:`vitsink_jax.train_lib.answer_nll_sum` once with ``dtype=float32`` and once with
``dtype=bfloat16``; and the bf16 run's loss once more with its logits rounded to bf16 (what a
head that outputs bf16 gives). Two logit scales: the checkpoint as transformers initialises it
(logits within about +-1) and its LM head scaled so the largest |logit| is 20 (a trained
model's range, where the bf16 grid step is 0.125). ``--out`` writes JSON.

    python benchmarks/bf16_loss.py            # medium config
    python benchmarks/bf16_loss.py --quick    # tiny config (used by the test suite)
"""

from __future__ import annotations

import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import vitsink_jax as vj
from forward import hf_llava, parse_args
from vitsink_jax.provenance import machine, package_versions, write_json
from vitsink_jax.train_lib import answer_nll_sum

ANSWER = 16  # answer tokens per row: the last ones


def losses(model, params, ids, pixels, loss_mask) -> dict:
    """The mean answer-token loss of one forward in ``model``'s compute dtype, the same with the
    logits rounded to bf16, and per-token NLLs ("nll", "nll_bf16_logits")."""
    logits = jax.jit(lambda p: model.apply({"params": p}, ids, pixels).logits)(params)
    n = jnp.sum(loss_mask[:, 1:])
    rounded = logits.astype(jnp.bfloat16).astype(jnp.float32)

    def nll(x):
        logp = jax.nn.log_softmax(x[:, :-1], -1)
        return np.asarray(-jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0])[
            np.asarray(loss_mask[:, 1:])]

    return {"loss": float(answer_nll_sum(logits, ids, loss_mask) / n),
            "loss_bf16_logits": float(answer_nll_sum(rounded, ids, loss_mask) / n),
            "nll": nll(logits), "nll_bf16_logits": nll(rounded),
            "logits_on_bf16_grid": bool(jnp.all(rounded == logits)),
            "max_abs_logit": float(jnp.max(jnp.abs(logits)))}


def main(argv=None) -> dict:
    args, s, _ = parse_args(__doc__, argv, repeats=1)
    hf = hf_llava(s)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        m32, params = vj.load_pretrained(d)
        m16, _ = vj.load_pretrained(d, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    n_img = m32.config.num_image_tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(3, s["vocab"] - 2, size=(s["batch"], s["text"] + n_img)).astype(np.int32)
    ids[:, 4:4 + n_img] = s["vocab"] - 1
    pixels = jnp.asarray(rng.standard_normal((s["batch"], 3, s["image"], s["image"])), jnp.float32)
    loss_mask = np.zeros(ids.shape, bool)
    loss_mask[:, -ANSWER:] = True
    ids, loss_mask = jnp.asarray(ids), jnp.asarray(loss_mask)

    rows = {}
    for name in ("init", "max_logit_20"):
        p = params
        if name != "init":
            top = rows["init"]["fp32"]["max_abs_logit"]
            p = {**params, "language_model": {**params["language_model"], "lm_head": {
                "kernel": params["language_model"]["lm_head"]["kernel"] * (20.0 / top)}}}
        fp32 = losses(m32, p, ids, pixels, loss_mask)
        bf16 = losses(m16, p, ids, pixels, loss_mask)
        row = {"fp32": fp32, "bf16": bf16,
               "abs_loss_diff": abs(bf16["loss"] - fp32["loss"]),
               "abs_loss_diff_bf16_logits": abs(bf16["loss_bf16_logits"] - fp32["loss"]),
               "max_abs_token_nll_diff": float(np.max(np.abs(bf16["nll"] - fp32["nll"]))),
               # what rounding the bf16 run's logits to bf16 alone changes
               "max_abs_token_nll_rounding": float(np.max(np.abs(bf16["nll_bf16_logits"] - bf16["nll"])))}
        for r in (fp32, bf16):
            del r["nll"], r["nll_bf16_logits"]
        rows[name] = row
        print(f"{name:>13}: loss fp32 {fp32['loss']:.5f}, bf16 {bf16['loss']:.5f} "
              f"(|diff| {row['abs_loss_diff']:.2e}, max per-token {row['max_abs_token_nll_diff']:.2e}); "
              f"bf16 with bf16-rounded logits |diff| {row['abs_loss_diff_bf16_logits']:.2e} "
              f"(rounding alone: max per-token {row['max_abs_token_nll_rounding']:.2e}); "
              f"bf16 logits on the bf16 grid: {bf16['logits_on_bf16_grid']}")
    result = {"config": s, "answer_tokens_per_row": ANSWER, "results": rows,
              "versions": package_versions(), "machine": machine(), "device": str(jax.devices()[0])}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
