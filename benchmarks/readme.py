"""Writes the measured figures of the README and docs/ pages from the committed result files, so
they cannot drift.

    python benchmarks/readme.py            # rewrite the generated blocks of README.md and docs/*.md
    python benchmarks/readme.py --check    # exit 1 naming the blocks that differ (the suite runs it)

A generated block sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``;
everything between the markers is this script's. Each block starts with the machine and date
its figures were measured on (``machine`` in the result; older results did not record it, and
the block says so). Sources: ``benchmarks/results.json`` (the benchmark scripts' ``--out``
files, merged by name), ``benchmarks/suite.json`` (the test run's summary, written by
``VITSINK_JAX_SUITE_JSON=benchmarks/suite.json python -m pytest -q -n 2 tests``) and the
main job's / interventions mode's reports (``study.json``, ``interventions.json``; see
:data:`RUNS`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
# a block: its opening marker's indentation (kept on every line), name, body, closing marker
BLOCK = re.compile(r"^([ \t]*)<!-- generated:([\w-]+) -->.*?<!-- /generated:\2 -->", re.S | re.M)


def _ms(s: float) -> str:
    return f"{1000 * s:.1f} ms"


def _x(r: float) -> str:
    return f"{r:.2f}x"


def _ratio(e: dict, key: str) -> str:
    """A time ratio with its min-max over the run's timing rounds, where the run recorded them."""
    if e.get(key) is None:
        return "-"
    spread = e.get(key + "_range")
    return f"{e[key]:.2f}" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")


def _e(v: float) -> str:
    """3.0e-6 (not Python's 3.0e-06); 0 for zero."""
    if v == 0:
        return "0"
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{v:.1e}").replace("e+", "e")


def measured_on(*entries: dict) -> str:
    """One line naming where and when ``entries`` were measured."""
    seen = []
    for e in entries:
        m = e.get("machine")
        text = (f"{m['cpu']}, {m['cores']} cores, {m['device_kind']}, {m['date']}" if m else
                "machine and date not recorded (results from before the benchmarks recorded them)")
        if text not in seen:
            seen.append(text)
    return "_Measured on: " + "; ".join(seen) + "._"


def speed(r: dict) -> list:
    f, g, g128 = r["forward"], r["generate"], r["generate_128_new_tokens"]
    return [measured_on(f, g, g128), "",
            "| benchmark | HF PyTorch | vitsink_jax | x faster than HF | notes |",
            "|---|---|---|---|---|",
            f"| `forward.py` prefill forward | {_ms(f['hf_eager_s'])} (eager) | {_ms(f['vitsink_jax_jit_s'])} (jit) "
            f"| {_x(f['speedup_vs_hf'])} | {f['achieved_flops_per_s'] / 1e9:.0f} GFLOP/s = "
            f"{100 * f['fraction_of_matmul_peak']:.0f}% of the {f['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s "
            f"matmul peak measured in the same run; max \\|logit diff\\| {_e(f['max_abs_logit_diff'])} |",
            f"| sink detection + sink-to-front on that forward | | {100 * f['sink_to_front_overhead']:+.1f}% | "
            f"| top-4 rule |",
            f"| `generate.py` greedy, {g['new_tokens']} new tokens incl. prefill | {g['hf_generate_s'] * 1000:.0f} ms "
            f"({g['hf_tokens_per_s']:.0f} tok/s) | {g['vitsink_jax_generate_s'] * 1000:.0f} ms "
            f"({g['vitsink_jax_tokens_per_s']:.0f} tok/s) | {_x(g['speedup_vs_hf'])} | tokens "
            f"{'identical' if g['tokens_equal'] else 'DIFFERENT'} |",
            f"| `generate.py` one decode step ({g['new_tokens']} new tokens) | {1000 * g['hf_decode_step_s']:.2f} ms "
            f"| {1000 * g['decode_step_s']:.2f} ms | {_x(g['decode_speedup_vs_hf'])} | "
            f"{g['bytes_per_decode_step'] / 1e6:.0f} MB of weights + KV cache per step: "
            f"{g['bytes_per_decode_step'] / g['decode_step_s'] / 1e9:.1f} GB/s = "
            f"{100 * g['fraction_of_bandwidth']:.0f}% of the {g['stream_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s "
            f"streaming read; the same weight matmuls alone in a compiled loop take "
            f"{1000 * g['matmul_floor_s']:.2f} ms, so the step runs at {100 * g['fraction_of_matmul_floor']:.0f}% "
            f"of that floor |",
            f"| `generate.py --new-tokens {g128['new_tokens']}` | {g128['hf_generate_s'] * 1000:.0f} ms "
            f"({g128['hf_tokens_per_s']:.0f} tok/s) | {g128['vitsink_jax_generate_s'] * 1000:.0f} ms "
            f"({g128['vitsink_jax_tokens_per_s']:.0f} tok/s) | {_x(g128['speedup_vs_hf'])} | tokens "
            f"{'identical' if g128['tokens_equal'] else 'DIFFERENT'}; decode step "
            f"{1000 * g128['decode_step_s']:.2f} vs {1000 * g128['hf_decode_step_s']:.2f} ms = "
            f"{_x(g128['decode_speedup_vs_hf'])} |"]


def switches(r: dict) -> list:
    """The speed / memory switches and what the benchmarks measured for each."""
    f, g, p = r["forward"], r["generate"], r["pruning"]["results"]
    seven = next(m for m in r["memory"]["results"] if m["loop"]["fsdp"]["shape"] == "llava-1.5-7b")
    loop, scan = seven["loop"], seven["scan"]
    return [measured_on(f, g, r["memory"], r["pruning"]), "",
            "| switch | where | effect measured | why |", "|---|---|---|---|",
            f"| `jax.jit` of the whole forward / decode loop | always | {_x(f['speedup_vs_hf'])} faster than HF eager prefill, "
            f"{_x(g['decode_speedup_vs_hf'])} faster per decode step | one XLA program, no Python per token |",
            "| static shapes: length buckets, fixed sink counts | eval, generate, train | no recompiles across "
            "prompts in a bucket (tested by counting compiles) | compile once |",
            "| `attention_impl`: `xla` (`jax.nn.dot_product_attention`, the default), `explicit`, `cudnn`, "
            "`splash` | train.py `--config.attention_impl`, `model.clone(...)` | "
            f"{_x(f['fused_attention_speedup'])} (medium forward, `xla` vs `explicit`) | XLA's CPU path is the same "
            "einsum-softmax-einsum; `cudnn` is cuDNN's flash kernel (GPU, bf16), `splash` the Pallas TPU kernel "
            "(not measured: no device lent); layers whose weights are read run `explicit` |",
            "| `remat=True` + `remat_policy` | train.py `--config.remat`, `--config.remat_policy` | same step, less "
            "activation memory; `nothing_saveable` (default), `dots_saveable`, `dots_with_no_batch_dims_saveable` "
            "trade memory for recompute | recompute in backward |",
            f"| `scan_layers=True` | train.py `--config.scan_layers`, `load_pretrained(..., scan_layers=True)` | 7B fsdp "
            f"step {scan['fsdp']['per_device_bytes'] / GIB:.1f} GiB per device vs "
            f"{loop['fsdp']['per_device_bytes'] / GIB:.1f} GiB with the loop ({_x(scan['ratio_to_ideal'])} vs "
            f"{_x(loop['ratio_to_ideal'])} of total/8); compile {scan['fsdp']['compile_s']:.0f} s vs "
            f"{loop['fsdp']['compile_s']:.0f} s | the all-gathered weights of one layer live at a time, not all of them |",
            f"| FastV pruning | `interventions` | prefill {_x(p['fastv:0.5:2']['prefill_speedup'])} / "
            f"{_x(p['fastv:0.75:2']['prefill_speedup'])} faster at r = 0.5 / 0.75 | fewer tokens after layer K |",
            "| donated train state | train.py (mesh and pmap) | no second copy of params + optimizer state | `donate_argnums` |"]


def bf16_loss(r: dict) -> list:
    b = r["bf16_loss"]
    rows = [measured_on(b), "",
            "| LM head | max \\|logit\\| | loss (fp32) | \\|loss bf16 - fp32\\| | worst token | "
            "with bf16 logits | logit rounding alone, worst token |", "|---|---|---|---|---|---|---|"]
    for name, label in (("max_logit_20", "scaled to \\|logit\\| 20"), ("init", "as transformers initialises it")):
        e = b["results"][name]
        rows.append(f"| {label} | {e['fp32']['max_abs_logit']:.1f} | {e['fp32']['loss']:.2f} | "
                    f"{_e(e['abs_loss_diff'])} | {e['max_abs_token_nll_diff']:.2g} | "
                    f"{_e(e['abs_loss_diff_bf16_logits'])} | {e['max_abs_token_nll_rounding']:.2g} |")
    return rows


def memory(r: dict) -> list:
    m = r["memory"]
    rows = [measured_on(m), "",
            "| shape | LLM layers | training, 1 device | fsdp over 8, per device | vs total/8 | compile (fsdp) "
            "| inference, 1 device | tensor-parallel over 8 | vs total/8 |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in m["results"]:
        for layout in ("loop", "scan"):
            e = shape[layout]
            name = e["fsdp"]["shape"].replace("llava", "LLaVA").replace("b", "B")
            bold = "**" if layout == "scan" else ""
            rows.append(f"| {name} | {layout} | {e['one_device']['per_device_bytes'] / GIB:.1f} GiB | "
                        f"{e['fsdp']['per_device_bytes'] / GIB:.2f} GiB | {bold}{_x(e['ratio_to_ideal'])}{bold} | "
                        f"{e['fsdp']['compile_s']:.0f} s | {e['inference_one_device']['per_device_bytes'] / GIB:.1f} GiB "
                        f"| {e['inference_tensor']['per_device_bytes'] / GIB:.2f} GiB | "
                        f"{bold}{_x(e['inference_ratio_to_ideal'])}{bold} |")
    seven = next(x for x in m["results"] if x["loop"]["fsdp"]["shape"] == "llava-1.5-7b")
    temp = {k: (seven[k]["fsdp"]["temp_bytes"] / GIB, seven[k]["one_device"]["temp_bytes"] / 8 / GIB)
            for k in ("loop", "scan")}
    return rows + ["", f"The 7B step's temporaries per device: {temp['loop'][0]:.1f} GiB with the loop against "
                       f"{temp['loop'][1]:.1f} GiB ideal (the one-device step's / 8); scanned: {temp['scan'][0]:.1f} "
                       f"vs {temp['scan'][1]:.1f}."]


def io(r: dict) -> list:
    e = r["io"]
    f, load = e["figures"], e["load"]
    two = e["two_processes"]
    plan = load["llava_1_5_7b_plan"]
    return [measured_on(e), "",
            "| figure | target | measured |", "|---|---|---|",
            f"| bytes on the fullest of 8 devices vs total / 8 | ~1x (+ small replicated params) | "
            f"{f['max_device_bytes_vs_total_over_8']:.3f}x |",
            f"| peak RSS growth of the load vs model (bf16) + largest tensor | <= 1.1x | "
            f"{f['load_peak_vs_model_plus_largest']:.2f}x ({load['load_peak_growth_bytes'] / GIB:.2f} GiB) |",
            f"| two processes x 4 devices: each one's growth vs half the model + largest tensor | <= 1.1x | "
            f"{f['two_process_peak_vs_half_plus_largest']:.2f}x "
            f"({max(p['peak_growth_bytes'] for p in two) / GIB:.2f} GiB each) |",
            f"| load vs `cat` of the same files, page cache dropped before each | >= 0.5x | "
            f"{f['load_throughput_vs_cat_cold']:.2f}x ({load['load_cold_s']:.2f} s vs {load['cat_cold_s']:.2f} s) |",
            f"| load vs `cat`, page cache warm | >= 0.5x | {f['load_throughput_vs_cat_warm']:.2f}x "
            f"({load['load_warm_s']:.2f} s vs {load['cat_warm_s']:.2f} s)"
            f"{': missed' if f['load_throughput_vs_cat_warm'] < 0.5 else ''} |",
            f"| sharded save (500 MB shards) growth vs max_shard_size + largest tensor | <= 1.1x | "
            f"{f['save_peak_vs_shard_plus_largest']:.2f}x ({load['save_peak_growth_bytes'] / 2 ** 20:.0f} MiB) |",
            f"| transformers on the saved folder vs ours, fp32 logits | <= 1e-4 relative | "
            f"{_e(e['parity']['relative'])} |",
            f"| LLaVA-1.5-7B plan, bf16, fsdp = 8 (abstract, nothing allocated) | ~1x | "
            f"{plan['max_device_bytes'] / GIB:.3f} GiB on the fullest device = {plan['vs_total_over_n']:.3f}x total / 8 |"]


def pruning(r: dict) -> list:
    p = r["pruning"]
    names = {"stock": "none", "fastv:0.5:2": "FastV r = 0.5", "fastv:0.75:2": "FastV r = 0.75",
             "fastv+sinks:0.5:2": "sink-aware r = 0.5", "fastv+sinks:0.75:2": "sink-aware r = 0.75"}
    rows = [measured_on(p), "",
            "| pruning | visual tokens | prefill | x faster than stock | cached decode step | x faster than stock |",
            "|---|---|---|---|---|---|"]
    for spec, label in names.items():
        e = p["results"][spec]
        rows.append(f"| {label} | {e['visual_tokens_kept']} | {_ms(e['prefill_s'])} | {_x(e['prefill_speedup'])} | "
                    f"{1000 * e['decode_step_s']:.2f} ms | {_x(e['decode_speedup'])} |")
    return rows


def memory_plan(r: dict) -> list:
    p = r["memory_plan"]
    names = {"tinyllava-0.5b": "TinyLLaVA-0.5B (SigLIP-so400m + Qwen2-0.5B)",
             "tinyllava-3.1b": "TinyLLaVA-3.1B (SigLIP-so400m + Phi-2)",
             "llava-1.5-7b": "LLaVA-1.5-7B stage 2 (CLIP-L/336 + Vicuna-7B)"}
    rows = [measured_on(p), "",
            "| recipe | params | slice | rows per chip | GiB per chip | fits |", "|---|---|---|---|---|---|"]
    for e in p["memory_plan"]:
        rows.append(f"| {names.get(e['shape'], e['shape'])} | {e['params'] / 1e9:.2f}B | {e['slice']} "
                    f"({e['devices']} chips x {e['hbm_gib']} GiB) | {e['micro_batch_per_chip']} | "
                    f"{e['per_device_bytes'] / GIB:.1f} | {'yes' if e['fits'] else 'no'} |")
    before = p.get("before")
    if before:  # the same recipe on the same chip counts, compiled at an earlier commit
        now = {str(e["devices"]): e["per_device_bytes"] for e in p["memory_plan"]
               if e["shape"] == before["shape"] and e["micro_batch_per_chip"] == before["micro_batch_per_chip"]}
        chips = sorted(set(now) & set(before["per_device_bytes"]), key=int)
        gib = lambda d: " / ".join(f"{d[c] / GIB:.1f}" for c in chips)  # noqa: E731
        rows += ["", f"{names.get(before['shape'], before['shape'])}, {before['micro_batch_per_chip']} rows "
                 f"per chip on {' / '.join(chips)} chips: {gib(now)} GiB per chip; at commit {before['commit']}: "
                 f"{gib(before['per_device_bytes'])} GiB ({before['note']})."]
    return rows


def data_build(r: dict) -> list:
    d = r["data_build"]
    t = d["targets"]
    rows = [measured_on(d), "",
            "| rows | worker processes | seconds | rows / s | peak memory (process tree) |",
            "|---|---|---|---|---|"]
    for e in d["runs"]:
        rows.append(f"| {e['source_rows']} | {e['workers']} | {e['seconds']:.1f} | {e['rows_per_s']:.0f} | "
                    f"{e['peak_rss_bytes'] / 2 ** 20:.0f} MiB |")
    return rows + ["", f"Peak memory at the larger size over the smaller: {_x(d['peak_rss_ratio'])} "
                   f"(target <= {t['peak_rss_ratio']}x: {_verdict(d['peak_rss_ratio'] <= t['peak_rss_ratio'])}); "
                   f"two workers over one: {_x(d['rate_two_workers_vs_one'])} (target >= "
                   f"{t['rate_two_workers_vs_one']}x on {d['host_cores']} cores: "
                   f"{_verdict(d['rate_two_workers_vs_one'] >= t['rate_two_workers_vs_one'])})."]


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


def waits(r: dict) -> list:
    e, s, t, i = r["eval_throughput"], r["startup"], r["train_step"], r["input_pipeline"]
    ips = e["items_per_s"]
    wait = i["data_wait_share"]
    one, two = i["loader"][0], i["loader"][-1]
    step = t["step"]
    return [measured_on(e, s, t, i), "",
            "| figure | target | measured | |", "|---|---|---|---|",
            f"| benchmark scoring (`eval_throughput.py`, {e['items']} multiple-choice items, batch "
            f"{e['batch_size']}; each photo's prompt prefix computed once) vs an HF generate loop (batch 1, "
            f"{e['new_tokens']} new tokens, SDPA) | >= "
            f"{e['targets']['vs_hf_generate']}x | {_x(e['speedup_vs_hf_generate'])} ({ips['ours']:.1f} vs "
            f"{ips['hf_generate']:.1f} items/s) | {_verdict(e['speedup_vs_hf_generate'] >= e['targets']['vs_hf_generate'])} |",
            f"| the same vs HF batched log-likelihood (SDPA) on the same rows | >= {e['targets']['vs_hf_loglik']}x | "
            f"{_x(e['speedup_vs_hf_loglik'])} ({ips['hf_loglik']:.1f} items/s); options "
            f"{'identical' if e['options_equal_hf_loglik'] else 'DIFFERENT'} on every item, max \\|score diff\\| "
            f"{_e(e['max_abs_score_diff_vs_hf'])} | {_verdict(e['speedup_vs_hf_loglik'] >= e['targets']['vs_hf_loglik'])} |",
            f"| compiles of the scorer after the first batch of a padded shape | 0 | "
            f"{e['compiles_after_first_call']} (counted in a test too) | {_verdict(e['compiles_after_first_call'] == 0)} |",
            f"| process start -> first train step, second run (persistent compile cache) vs HF | <= 1.5x | "
            f"{s['seconds']['train']['warm']:.1f} s vs {s['seconds']['train']['hf']:.1f} s = "
            f"{_x(s['warm_vs_hf']['train'])} (first run {s['seconds']['train']['cold']:.1f} s: "
            f"{s['compile']['train_cold']['compile_seconds']:.1f} s of compiling, "
            f"{s['compile']['train_warm']['compile_seconds']:.1f} s when warm) | {_verdict(s['warm_vs_hf']['train'] <= 1.5)} |",
            f"| process start -> first scored batch, second run vs HF's first forward | <= 1.5x | "
            f"{s['seconds']['eval']['warm']:.1f} s vs {s['seconds']['eval']['hf']:.1f} s = "
            f"{_x(s['warm_vs_hf']['eval'])} (first run {s['seconds']['eval']['cold']:.1f} s) | "
            f"{_verdict(s['warm_vs_hf']['eval'] <= 1.5)} |",
            f"| data-wait share of the step, mini-study recipe, prefetch on / off | < {100 * i['target_share']:.0f}% | "
            f"{100 * wait['on']:.2f}% / {100 * wait['off']:.1f}% | {_verdict(wait['on'] < i['target_share'])} |",
            f"| images / s the training loader sustains per host core | report | "
            f"one core: {one['images_per_s_per_core']:.0f}; two: {two['images_per_s']:.0f} | |",
            f"| full fine-tuning step (`train_step.py`, {t['trainable_params'] / 1e6:.0f}M params, AdamW) vs HF SDPA + "
            f"fused AdamW | >= 1.4x | {_x(t['speedup_vs_hf_sdpa'])} ({1000 * step['ours_fp32']['wall_s']:.0f} vs "
            f"{1000 * step['hf_sdpa']['wall_s']:.0f} ms; HF eager {1000 * step['hf_eager']['wall_s']:.0f} ms) | "
            f"{_verdict(t['speedup_vs_hf_sdpa'] >= 1.4)} |",
            f"| system CPU share of our step | < 10% | {100 * step['ours_fp32']['sys_share']:.1f}% (default malloc: "
            f"{100 * t['default_malloc']['step']['ours_fp32']['sys_share']:.0f}%, "
            f"{t['default_malloc']['step']['ours_fp32']['minor_faults']:,.0f} minor page faults per step; kept: "
            f"{step['ours_fp32']['minor_faults']:,.0f}) | {_verdict(step['ours_fp32']['sys_share'] < 0.1)} |",
            f"| our step in bf16 compute / fp32 with remat | report | {1000 * step['ours_bf16']['wall_s']:.0f} ms / "
            f"{1000 * step['ours_remat']['wall_s']:.0f} ms | |"]


# (family, tower, projector, LLM, layouts read, the test files its parity is read from, sink methods)
FAMILIES = (
    ("LLaVA-1.5 (llava-hf)", "CLIP, SigLIP, DINOv2 (+ registers)", "linear, mlp2x_gelu",
     "LLaMA / Vicuna, Qwen2, Phi-2, Phi-3", "llava-hf, original LLaVA codebase",
     ("tests/test_lvlm.py", "tests/test_phi.py"),
     "all: sink-to-the-front, token selection, Findings 1-4, FastV / sink-aware pruning, VAR, "
     "test-time registers, DIYSink training"),
    ("TinyLLaVA (Qwen2 / Phi-2)", "SigLIP", "mlp2x_gelu", "Qwen2, Phi-2", "TinyLLaVA Factory",
     ("tests/test_layouts.py",), "all (it is a LLaVA)"),
    ("Gemma 3 (`Gemma3ForConditionalGeneration`)", "SigLIP (its last state, post-LayerNorm)",
     "4 x 4 average pool, (1 + w) RMSNorm, one matrix",
     "Gemma 3 (local / global layers, q / k norms, bidirectional image blocks)",
     "transformers (`model_type: gemma3`)", ("tests/test_gemma3.py",),
     "all; the DIYSink model (a second Gemma 3 projector) and its checkpoint"),
    ("InternVL (`InternVLForConditionalGeneration`)",
     "InternViT (LayerNorm / RMSNorm blocks, q / k RMSNorm, LayerScale)",
     "pixel shuffle (2 x 2 patches per token), LayerNorm + MLP", "Qwen2, LLaMA",
     "transformers (`model_type: internvl`)", ("tests/test_internvl.py",), "all (per tile); the DIYSink model"),
    ("Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`)",
     "its ViT (windowed attention with full-attention blocks, 2-D RoPE, RMSNorm, dynamic resolution)",
     "patch merger (2 x 2 patches per token: RMSNorm, MLP)",
     "Qwen2 with multimodal RoPE (temporal / height / width ids)",
     "transformers (`model_type: qwen2_5_vl`; its files' `visual.` / `model.` keys and the in-memory "
     "`model.visual.` / `model.language_model.`)", ("tests/test_qwen2_5_vl.py",),
     "all but test-time registers (a register would have to sit in every attention window); the DIYSink model"),
    ("Phi-3.5-Vision, Molmo", "", "", "", "", (),
     "left out: transformers has no implementation to test against offline"),
)


def families(r: dict) -> list:
    """The model-family table; parity = the worst relative error of the family's test files in
    the suite run (suite.json)."""
    s = r["suite"]
    rows = [f"_Parity from the test run of {s['machine']['date']} (`benchmarks/suite.json`)._", "",
            "| family | tower | projector | LLM | layouts read | parity | sink methods |",
            "|---|---|---|---|---|---|---|"]
    for name, tower, projector, llm, layouts, files, methods in FAMILIES:
        worst = max((s["parity"][f] for f in files if f in s["parity"]), default=None)
        parity = "" if worst is None else _e(worst)
        rows.append(f"| {name} | {tower} | {projector} | {llm} | {layouts} | {parity} | {methods} |")
    return rows


def misses(r: dict) -> list:
    """Where the speed targets stand and what limits them: the profiles recorded with the
    eval_throughput, startup and train_step results."""
    e, st, ts = r["eval_throughput"], r["startup"], r["train_step"]
    prof, boot, roof = e["profile"], st["profile_warm_train"], ts["roofline"]
    hf_share = prof["forward_flops"] / prof["hf_forward_s"] / prof["matmul_peak_flops_per_s"]
    per_item = 1000 / e["items_per_s"]["ours"]
    host = 1000 * (e["host"]["pixels_s"] + e["host"]["tokenize_s"]) / e["items"]
    b, t = prof["batch_shape"]
    c = ts["config"]
    head = 6 * c["batch"] * ts["tokens"] * c["th"] * c["vocab"] / roof["step_flops"]  # LM head, fwd + bwd
    cold, warm = st["compile"]["train_cold"]["compile_seconds"], st["compile"]["train_warm"]["compile_seconds"]
    return [measured_on(e, st, ts), "",
            "What limits the speed figures, from profiles. **Scoring** is compute-bound, so it gains only by "
            f"doing less work: our plain forward of a batch of {b} x {t} tokens takes {prof['forward_s']:.2f} s "
            f"against HF's {prof['hf_forward_s']:.2f} s ({_x(prof['forward_speedup_vs_hf'])}; HF runs at "
            f"{100 * hf_share:.0f}% of the matmul peak measured in the same run). evaluate.py's scorer computes each "
            "photo's prompt prefix (template opening and image tokens: the vision tower, the projector and most "
            "of the LLM's tokens) once for all the items that show it and runs only each item's own tokens "
            "per item, from the prefix's KV cache (3 items per photo here, 2 in MME, 4 in MMBench's circular "
            f"evaluation); {per_item:.0f} ms per item remain, of which host work (tokenizing, decoding, padding; "
            f"prepared in a thread while the device scores) is {host:.1f} ms. FastV, VAR, DIYSink ReW and CoT "
            "routes change the image's tokens with the question, so they score full rows. **Process start**: "
            f"the compile cache removes compiling ({cold:.1f} s -> {warm:.1f} s); a warm train.py start "
            + ("no longer imports torch (the parsed config.json and the tokenizer's class come from "
               "`vitsink_jax.resolved`, TensorBoard files are written without tensorboardX)" if not boot["torch_import"]
               else f"still imports torch ({boot['torch_import']:.1f} s)")
            + " and, in a cProfile of one warm run (overhead included), spends "
            f"~{boot['jax_import']:.1f} s importing JAX, ~{boot['load_checkpoint']:.1f} s loading the checkpoint "
            f"(~{boot['abstract_init']:.1f} s of it the abstract init that plans the params), "
            f"~{boot['load_tokenizer']:.1f} s loading the tokenizer (~{boot['transformers_import']:.1f} s of it "
            f"importing transformers), ~{boot['load_data']:.1f} s preparing the data and ~{boot['first_step']:.1f} s "
            "in the first step (tracing it, since the cache keys on the traced program, loading the compiled "
            "program, running it). **The training step** is compute-bound on both sides: "
            f"{roof['step_flops'] / 1e9:.0f} GFLOP per step (XLA's count), ours at "
            f"{100 * roof['ours_fp32_fraction_of_peak']:.0f}% and HF at {100 * roof['hf_sdpa_fraction_of_peak']:.0f}% "
            "of the matmul peak measured in the same run, so 1.4x over HF would need "
            f"~{140 * roof['hf_sdpa_fraction_of_peak']:.0f}% of that peak"
            f"{', more than the peak' if roof['hf_sdpa_fraction_of_peak'] >= 1 / 1.4 else ''} (matmuls of this "
            "step's shapes reach the peak when timed alone). A JAX profiler trace of our step (op time summed "
            "over the two threads): " + ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(
                ts["op_ms_per_step"].items(), key=lambda kv: -kv[1]))
            + "; the non-matmul part (layer norms, softmax, GELU, the AdamW update, the layouts the weight "
            "gradients need) is what a faster step would have to shrink, on both sides. The work that could go "
            f"is small: the LM head is {100 * head:.0f}% of the step and most of its tokens carry no loss - not done."]


def _pct(acc: float) -> str:
    return f"{100 * acc:.2f}"


def study(r: dict) -> list:
    """The main job's table (``python evaluate.py``'s study.json)."""
    s = r["study"]
    labels = {"single none": "single MLP, stock", "single front": "single MLP, sink-to-front",
              "diysink none": "DIYSink (dual MLP + ReW), its own layout (sinks first)"}
    rows = [measured_on(s), "",
            "| model, visual-token order | overall | tag:global | tag:local | counting | position | scene |",
            "|---|---|---|---|---|---|---|"]
    for name in [*(k for k in labels if k in s["results"]), *(k for k in s["results"] if k not in labels)]:
        e = s["results"][name]
        tag, cat = e["per_tag"], e["per_category"]
        rows.append(f"| {labels.get(name, name)} | {_pct(e['accuracy'])} | {_pct(tag['global']['acc'])} | "
                    f"{_pct(tag['local']['acc'])} | {_pct(cat['counting']['acc'])} | {_pct(cat['position']['acc'])} | "
                    f"{_pct(cat['scene']['acc'])} |")
    return rows


def interventions(r: dict) -> list:
    """``python evaluate.py --config.mode=interventions``'s table (interventions.json)."""
    iv = r["interventions"]

    def label(spec: str) -> str:
        name, *args = spec.split(":")
        return {"stock": "stock", "front": "sink-to-front",
                "fastv": f"FastV r = {args[0]}" if args else "FastV",
                "fastv+sinks": f"sink-aware r = {args[0]}" if args else "sink-aware",
                "fastv-mean": f"FastV, mean query r = {args[0]}" if args else "FastV, mean query",
                "fastv-mean+sinks": f"sink-aware, mean query r = {args[0]}" if args else "sink-aware, mean query",
                "fastv-debias": f"FastV, debiased r = {args[0]}" if args else "FastV, debiased",
                "fastv-debias+sinks": f"sink-aware, debiased r = {args[0]}" if args else "sink-aware, debiased",
                "var": f"VAR p = {args[0]}" if args else "VAR",
                "var-vit": f"VAR on ViT sinks p = {args[0]}" if args else "VAR on ViT sinks",
                "registers": f"test-time registers ({args[0]} neurons)" if args else "test-time registers",
                "fastervlm": f"FasterVLM, keep {args[0]}" if args else "FasterVLM",
                "visionzip": f"VisionZip {' + '.join(args)}" if args else "VisionZip",
                "prumerge": f"PruMerge ({args[0]} neighbours)" if args else "PruMerge",
                "divprune": f"DivPrune, keep {args[0]}" if args else "DivPrune"}.get(name, spec)

    rows = [measured_on(iv), "",
            "| intervention | visual tokens | ViT sinks kept | overall | global | local | "
            "prefill, x of stock time | decode step, x of stock time |",
            "|---|---|---|---|---|---|---|---|"]
    specs = [x for x in iv["config"]["compare"]["specs"] if x in iv["results"]]  # the run's order
    for spec in specs:
        e = iv["results"][spec]
        tag = e["per_tag"]
        share = "-" if e.get("vit_sinks_kept") is None else f"{e['vit_sinks_kept']:.2f}"
        rows.append(f"| {label(spec)} | {e['visual_tokens_kept']} | {share} | {_pct(e['accuracy'])} | "
                    f"{_pct(tag['global']['acc'])} | {_pct(tag['local']['acc'])} | "
                    f"{_ratio(e, 'prefill_vs_first')} | {_ratio(e, 'decode_vs_first')} |")
    return rows


def suite(r: dict) -> list:
    s = r["suite"]
    return [f"`-n 2` runs two pytest-xdist workers: {s['passed']} tests passed in {s['seconds'] / 60:.1f} minutes "
            f"({s['machine']['cpu']}, {s['machine']['cores']} cores, {s['machine']['date']})."]


BLOCKS = {"families": families, "study": study, "interventions": interventions, "speed": speed,
          "switches": switches, "misses": misses, "bf16-loss": bf16_loss, "memory": memory, "io": io, "pruning": pruning,
          "memory-plan": memory_plan, "waits": waits, "suite": suite, "data-build": data_build}


# the other result files: name -> (file in benchmarks/, the command that writes it)
RUNS = {"suite": ("suite.json", "VITSINK_JAX_SUITE_JSON=benchmarks/suite.json python -m pytest -q -n 2 tests"),
        "study": ("study.json", "python evaluate.py --workdir=W, then copy W/study.json"),
        "interventions": ("interventions.json",
                          "python evaluate.py --config.mode=interventions --workdir=W, then copy W/interventions.json")}


def sources(root: Path = ROOT) -> dict:
    """The committed result files: results.json's entries by name, plus :data:`RUNS`. Raises
    FileNotFoundError naming a missing one and the command that writes it."""
    out = json.loads((root / "benchmarks" / "results.json").read_text())
    for name, (file, command) in RUNS.items():
        path = root / "benchmarks" / file
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; write it with {command}")
        out[name] = json.loads(path.read_text())
    return out


def render(readme: str, results: dict) -> str:
    """``readme`` with every generated block rewritten from ``results``. Raises ValueError naming
    a block without its closing marker or one this script does not know."""
    def block(m):
        indent, name = m.group(1), m.group(2)
        if name not in BLOCKS:
            raise ValueError(f"README block {name!r}: no such generated block ({', '.join(BLOCKS)})")
        body = [f"<!-- generated:{name} -->", *BLOCKS[name](results), f"<!-- /generated:{name} -->"]
        return "\n".join(indent + line if line else line for line in body)
    opened = re.findall(r"<!-- generated:([\w-]+) -->", readme)
    closed = re.findall(r"<!-- /generated:([\w-]+) -->", readme)
    if opened != closed:
        raise ValueError(f"README generated blocks do not pair up: opened {opened}, closed {closed}")
    return re.sub(BLOCK, block, readme)


def stale_blocks(readme: str, results: dict) -> list:
    """Names of the blocks whose text differs from what :func:`render` writes."""
    now = {m.group(2): m.group(0) for m in BLOCK.finditer(readme)}
    want = {m.group(2): m.group(0) for m in BLOCK.finditer(render(readme, results))}
    return [name for name in now if now[name] != want[name]]


def pages(root: Path = ROOT) -> list:
    """The pages that hold generated blocks: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def placement(texts: dict) -> dict:
    """{block name: the page holding it} for ``texts`` ({page: text}). Raises ValueError naming a
    block of :data:`BLOCKS` that no page holds or one that two pages hold."""
    where = {}
    for page, text in texts.items():
        for m in BLOCK.finditer(text):
            if m.group(2) in where:
                raise ValueError(f"generated block {m.group(2)!r} is in both {where[m.group(2)].name} "
                                 f"and {page.name}")
            where[m.group(2)] = page
    missing = sorted(set(BLOCKS) - set(where))
    if missing:
        raise ValueError(f"generated blocks {missing} are on no page ({', '.join(p.name for p in texts)})")
    return where


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report blocks that differ (exit 1)")
    args = ap.parse_args(argv)
    texts = {page: page.read_text() for page in pages()}
    placement(texts)
    results = sources()
    stale = {page: stale_blocks(text, results) for page, text in texts.items()}
    if args.check:
        for page, names in stale.items():
            if names:
                print(f"{page}: generated blocks out of date: {', '.join(names)} "
                      f"(run python benchmarks/readme.py)", file=sys.stderr)
        return int(any(stale.values()))
    for page, text in texts.items():
        if stale[page]:
            page.write_text(render(text, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
