"""Benchmark-scoring throughput: multiple-choice items per second through evaluate.py's path
(``eval_lib.predict`` -> ``loglik_scores``: one compiled scorer per length bucket, rows packed by
length, host work overlapped) vs two Hugging Face PyTorch contenders on the same medium LLaVA and
items, in one run, the calls taking turns:

* a VLMEvalKit-style generate loop: batch 1, greedy, 8 new tokens at most, SDPA attention, the
  option letter parsed from the text;
* HF batched log-likelihood: the same scoring rows as ours (prompt + candidates), batched,
  sorted by length, padded to each batch's longest row, SDPA, ``torch.inference_mode``.

Every contender does its host work (tokenization, image decoding and preprocessing) inside the
timed call. The script fails unless ours and the HF log-likelihood choose the same option on
every item; it prints the generate loop's agreement too. ``--out`` writes JSON.

    python benchmarks/eval_throughput.py            # medium config, 48 items
    python benchmarks/eval_throughput.py --quick    # tiny config (used by the test suite)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.default import get_config  # noqa: E402
from forward import compiled_flops, llava_inputs, matmul_peak, parse_args  # noqa: E402
from vitsink_jax import eval_lib as E  # noqa: E402
from vitsink_jax.data.padding import right_pad  # noqa: E402
from vitsink_jax.data.prompts import LETTERS, prompt_format  # noqa: E402
from vitsink_jax.data.synthetic import SUBJECTS, embedded_benchmark  # noqa: E402
from vitsink_jax.embedded import embedded_tokenizer  # noqa: E402
from vitsink_jax.provenance import machine, package_versions, write_json  # noqa: E402
from vitsink_jax.scores import extract_choice  # noqa: E402
from vitsink_jax.timing import interleaved_seconds  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def hf_generate_choices(hf, model, tok, records: list, cfg, new_tokens: int = 8) -> list:
    """VLMEvalKit-style: one item at a time, greedy ``generate``, the option letter parsed from
    the decoded text ("" when none is named)."""
    c, out = model.config, []
    with torch.inference_mode():
        for rec in records:
            ids, _ = E.encode_question_prompt(tok, E.prompt_text(rec, cfg.templates, cfg.mc_format),
                                              prompt_format(c, tok))
            pixels = E._pixels(model, rec, {})[None]
            gen = hf.generate(input_ids=torch.from_numpy(ids[None]).long(),
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              pixel_values=torch.from_numpy(pixels), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=tok.pad_token_id or 0)
            text = tok.decode(gen[0, len(ids):].tolist(), skip_special_tokens=True)
            out.append(extract_choice(text, rec["options"]))
    return out


def hf_loglik_scores(hf, model, tok, records: list, cfg) -> list:
    """Per record the log-likelihood of each candidate from HF forwards over ``scoring_rows``
    (ours), ``cfg.batch_size`` rows a batch, sorted by length, right-padded to the batch's
    longest; log-softmax only where a score is read (the last position, the target tokens)."""
    c = model.config
    rows = [(i, r) for i, rec in enumerate(records)
            for r in E.scoring_rows(tok, rec, cfg.templates, prompt_format(c, tok),
                                    cfg.mc_format)]
    rows.sort(key=lambda row: len(row[1][0]))
    scores = [np.zeros(len(E.candidates(r, cfg.mc_format))) for r in records]
    cache, pad = {}, tok.pad_token_id or 0
    with torch.inference_mode():
        for k in range(0, len(rows), cfg.batch_size):
            chunk = rows[k:k + cfg.batch_size]
            length = max(len(r[0]) for _, r in chunk)
            ids, mask = right_pad([r[0] for _, r in chunk], length, pad)
            targets = torch.from_numpy(right_pad([r[1] for _, r in chunk], length, -1)[0]).long()
            pixels = np.stack([E._pixels(model, records[i], cache) for i, _ in chunk])
            logits = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                        pixel_values=torch.from_numpy(pixels)).logits
            rows_b = torch.arange(len(chunk))
            last = torch.log_softmax(logits[rows_b, torch.from_numpy(mask.sum(1) - 1)].float(), -1)
            where = targets >= 0
            tgt = torch.log_softmax(logits[where].float(), -1).gather(-1, targets[where][:, None])[:, 0]
            seq = torch.zeros(len(chunk)).index_add_(0, where.nonzero()[:, 0], tgt).numpy()
            for b, (i, (_, _, cand, which, _)) in enumerate(chunk):
                if which < 0:
                    scores[i] = last[b, torch.from_numpy(cand).long()].numpy()
                else:
                    scores[i][which] = seq[b]
    return scores


def host_seconds(model, tok, records: list, cfg) -> dict:
    """Seconds of our host work for ``records`` alone: tokenization (scoring rows), image
    decoding + preprocessing."""
    c = model.config
    t0 = time.perf_counter()
    for rec in records:
        E.scoring_rows(tok, rec, cfg.templates, prompt_format(c, tok), cfg.mc_format)
    t1 = time.perf_counter()
    cache = {}
    for rec in records:
        E._pixels(model, rec, cache)
    return {"tokenize_s": t1 - t0, "pixels_s": time.perf_counter() - t1}


def device_profile(hf, model, params, tok, records: list, cfg, repeats: int, quick: bool) -> dict:
    """What one scoring batch costs (the first ``cfg.batch_size`` prompts, padded to their length
    bucket): our jitted forward, its vision tower alone and HF's forward (SDPA), in turns;
    our forward's FLOPs (XLA's count) against the matmul peak measured here."""
    b = E.prompt_batch(model, tok, records[:cfg.batch_size], cfg)
    fwd = jax.jit(lambda p, i, x, m: model.apply({"params": p}, i, x, attention_mask=m).logits)
    vision = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.vision_features)[0])
    t_in = dict(input_ids=torch.from_numpy(b["ids"]).long(), attention_mask=torch.from_numpy(b["mask"]),
                pixel_values=torch.from_numpy(b["pixels"]))
    t = interleaved_seconds({"forward": lambda: fwd(params, b["ids"], b["pixels"], b["mask"]),
                             "vision": lambda: vision(params, b["pixels"]),
                             "hf_forward": torch.inference_mode()(lambda: hf(**t_in).logits)}, repeats)
    flops = compiled_flops(fwd, params, b["ids"], b["pixels"], b["mask"])
    peak = matmul_peak(256 if quick else 2048, repeats)
    return {"batch_shape": list(b["ids"].shape), "forward_s": t["forward"], "vision_s": t["vision"],
            "vision_share": t["vision"] / t["forward"], "hf_forward_s": t["hf_forward"],
            "forward_speedup_vs_hf": t["hf_forward"] / t["forward"], "forward_flops": flops,
            "fraction_of_matmul_peak": flops / t["forward"] / peak, "matmul_peak_flops_per_s": peak}


def main(argv=None) -> dict:
    args, s, repeats = parse_args(__doc__, argv, repeats=3,
                                  items=dict(type=int, default=48, help="items (medium config)"))
    s = {**s, "vocab": max(s["vocab"], 512)}  # a byte-level BPE tokenizer needs 256 + ids
    hf, model, params, _, _ = llava_inputs(s)
    hf.set_attn_implementation("sdpa")
    cfg = get_config().eval  # evaluate.py's defaults: batch 8, length bucket 32, letter format
    tok = embedded_tokenizer(s["vocab"])
    photos = list(SUBJECTS)[:2] if args.quick else list(SUBJECTS)
    n = 6 if args.quick else args.items  # three questions (4 options each) per photo variant
    records = embedded_benchmark(seed=0, variants=-(-n // (3 * len(photos))), size=s["image"],
                                 photos=photos)[:n]
    last = {}  # each contender's latest output (options chosen; scores)

    def ours():
        preds = E.predict(model, params, tok, records, cfg, cfg.parallel)
        last["ours"] = [p["prediction"] for p in preds], [p["scores"] for p in preds]
        return last["ours"][0]

    def hf_loglik():
        scores = hf_loglik_scores(hf, model, tok, records, cfg)
        last["hf_loglik"] = [LETTERS[int(np.argmax(x))] for x in scores], scores
        return last["hf_loglik"][0]

    def hf_generate():
        last["hf_generate"] = hf_generate_choices(hf, model, tok, records, cfg, cfg.max_new_tokens)
        return last["hf_generate"]

    compiles = []

    def listen(event, seconds, **_):
        if event == COMPILE_EVENT:
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listen)
    t0 = time.perf_counter()
    ours()  # the first call compiles (once per length bucket)
    first_s, first_compiles = time.perf_counter() - t0, len(compiles)
    t = interleaved_seconds({"ours": ours, "hf_loglik": hf_loglik, "hf_generate": hf_generate},
                            repeats)  # the calls take turns: a slow spell hits all of them
    jax.monitoring.unregister_event_duration_listener(listen)
    timed_compiles = len(compiles) - first_compiles
    if timed_compiles:
        raise SystemExit(f"error: the scorer compiled {timed_compiles} more time(s) after the first call")

    (mine, ours_scores), (ref, ref_scores), gen = last["ours"], last["hf_loglik"], last["hf_generate"]
    diff = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(ours_scores, ref_scores))
    margin = min(float(np.diff(np.sort(x)[-2:])[0]) for x in ref_scores)
    rate = {k: n / v for k, v in t.items()}
    result = {"config": s, "items": n, "repeats": repeats, "batch_size": cfg.batch_size,
              "length_bucket": cfg.length_bucket, "new_tokens": cfg.max_new_tokens,
              "torch_threads": torch.get_num_threads(), "seconds": t, "items_per_s": rate,
              "speedup_vs_hf_generate": t["hf_generate"] / t["ours"],
              "speedup_vs_hf_loglik": t["hf_loglik"] / t["ours"],
              "first_call_s": first_s, "first_call_compiles": first_compiles,
              "compiles_after_first_call": timed_compiles,
              "host": host_seconds(model, tok, records, cfg),
              "profile": device_profile(hf, model, params, tok, records, cfg, repeats, args.quick),
              "options_equal_hf_loglik": mine == ref, "max_abs_score_diff_vs_hf": diff,
              "min_top2_margin": margin,
              "generate_agreement": float(np.mean([a == b for a, b in zip(mine, gen)])),
              "targets": {"vs_hf_generate": 2.5, "vs_hf_loglik": 1.5},
              "versions": package_versions(), "machine": machine(), "device": str(jax.devices()[0])}
    host, dev = result["host"], result["profile"]
    print(f"{n} multiple-choice items, batch {cfg.batch_size}, fp32: ours (evaluate.py's path) "
          f"{rate['ours']:.1f} items/s, HF batched log-likelihood {rate['hf_loglik']:.1f} items/s "
          f"-> {result['speedup_vs_hf_loglik']:.2f}x, HF generate loop (batch 1, "
          f"{cfg.max_new_tokens} new tokens) {rate['hf_generate']:.1f} items/s -> "
          f"{result['speedup_vs_hf_generate']:.2f}x; options equal to HF log-likelihood: "
          f"{mine == ref} (max |score diff| {diff:.1e}, smallest top-2 margin {margin:.1e}); "
          f"generate loop agrees on {100 * result['generate_agreement']:.0f}%; first call "
          f"{first_s:.1f} s with {first_compiles} compile(s), none after; host work "
          f"{1e3 * (host['tokenize_s'] + host['pixels_s']) / n:.1f} ms/item "
          f"(of {1e3 * t['ours'] / n:.1f} ms/item); one batch {dev['batch_shape']}: our forward "
          f"{1e3 * dev['forward_s']:.0f} ms (vision tower {100 * dev['vision_share']:.0f}%), HF "
          f"{1e3 * dev['hf_forward_s']:.0f} ms -> {dev['forward_speedup_vs_hf']:.2f}x; ours at "
          f"{100 * dev['fraction_of_matmul_peak']:.0f}% of the "
          f"{dev['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s matmul peak")
    if mine != ref:
        bad = [(r["index"], a, b) for r, a, b in zip(records, mine, ref) if a != b]
        raise SystemExit(f"error: ours and HF log-likelihood chose different options: {bad[:10]}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
