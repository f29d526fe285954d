"""Interventions mode: sink interventions side by side on one benchmark and one model.

Each spec is a switch on the same params (:mod:`vitsink_jax.interventions`): the stock model,
the paper's sink-to-the-front (Sec. 4.1), FastV token pruning and its sink-aware form (the
paper's contrast: the few high-norm tokens carry the global meaning and are kept), VAR (Kang et
al.: attention moved off the LLM's sink tokens) and test-time registers (Jiang et al.: the
register neurons' outliers moved into an extra token) and token reductions before the LLM
(FasterVLM, VisionZip, PruMerge, DivPrune), after ``docs/interventions.md``. Per spec
the accuracy overall / per tag, the visual tokens kept, the share of the images' ViT sinks kept
(counted on every benchmark row's prompt) and the prefill and decode-step time
against the first spec's, timed in turns on one batch. A spec's figures are gathered in
:func:`score_interventions`, the table is built in :func:`intervention_table` (a new column is
one header and one cell there); writes ``interventions.json`` and
``plots/accuracy_vs_tokens_kept.png``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .. import eval_lib, plots, timing
from ..interventions import TestTimeRegisters, parse, report as sink_report
from ..interventions.registers import register_neurons, search_pixels
from ..interventions.var import llm_sink_dims
from ..sinks import detect
from ..sinks.fuse import VisualTokenPolicy
from .common import (benchmark_records, benchmark_rules, checkpoint_record, checkpoint_spec, drop_too_long,
                     load_lvlm, predict_benchmark, require_tokenizer, write_results)


def run_interventions(cfg, workdir: Path) -> dict:
    """Sink interventions side by side on one benchmark and one model (default: the mini-study
    single-MLP model): accuracy overall / global / local, visual tokens kept, and prefill time
    and prefill / decode-step time relative to the first spec (stock), measured in this run on
    the same batch (decode: a compiled loop of ``compare.decode_steps`` greedy cached steps).
    On a model whose vision tower dominates the prefill (the mini study) pruning the LLM cannot
    show there: benchmarks/pruning.py measures it on a medium LLaVA."""
    k = cfg.compare
    if not checkpoint_spec(cfg):
        cfg = cfg.copy_and_resolve_references()
        cfg.checkpoint, cfg.eval.mc_format = k.checkpoint, k.mc_format
    ckpt, model, params = load_lvlm(cfg, workdir)
    tokenizer = require_tokenizer(ckpt, "interventions mode needs the checkpoint's tokenizer")
    records, source, order = benchmark_records(cfg, workdir)
    records, too_long = drop_too_long(cfg, model, tokenizer, records, order)
    rule = detect.SinkRule(**{**cfg.sink, "rule": k.rule})
    if model.config.diysink is not None:  # its projectors were trained on its own rule
        rule = model.config.diysink.rule
    batch = eval_lib.prompt_batch(model, tokenizer, records[:cfg.eval.batch_size], cfg.eval)
    results, not_run = score_interventions(cfg, workdir, (model, params, tokenizer), records, order, rule,
                                           batch)
    table = intervention_table(results)
    print(table)
    plot = plots.pruning_curves(pruning_curves(results), workdir / "plots" / "accuracy_vs_tokens_kept.png")
    report = {**checkpoint_record(cfg, ckpt),
              "benchmark": cfg.benchmark.name, **source, "skipped_too_long": too_long,
              "sink_rule": dataclasses.asdict(rule), "timing_batch_rows": int(batch["ids"].shape[0]),
              "results": results, "not_run": not_run, "table": table}
    write_results(workdir / "interventions.json", report, f" and {plot}")
    return report


class NotRun(Exception):
    """An intervention spec that does not apply to this model; its reason is reported in
    ``not_run`` and the run goes on with the other specs."""


def score_interventions(cfg, workdir: Path, loaded: tuple, records: list, order: dict, rule,
                        batch: dict) -> tuple[dict, dict]:
    """({spec: benchmark summary + ``visual_tokens_kept``, ``register_neurons``,
    ``var_sink_dims`` and the times of :func:`add_timings`}, {spec not run: why}) for each of
    ``cfg.compare.specs`` on the model of ``loaded`` (model, params, tokenizer) with its sinks
    by ``rule``; timed on ``batch``; writes ``predictions_<spec>.jsonl``."""
    (model, params, tokenizer), k = loaded, cfg.compare
    rules, n_vis = benchmark_rules(cfg), model.config.num_image_tokens
    step = cfg.eval.batch_size  # the ViT sinks kept are counted on every benchmark row's prompt
    share_batches = [eval_lib.prompt_batch(model, tokenizer, records[i:i + step], cfg.eval)
                     for i in range(0, len(records), step)]
    results, not_run, calls, found = {}, {}, {}, {}
    for spec in k.specs:
        try:
            iv, order_, neurons = build_intervention(spec, model, params, records, rule, batch, found)
            m = intervened(model, spec, iv, order_, rule)
        except NotRun as e:
            not_run[spec] = str(e)
            print(f"intervention {spec}: not run ({not_run[spec]})")
            continue
        print(f"intervention {spec}: {iv}")
        preds = predict_benchmark(cfg, m, params, tokenizer, records, order, workdir, spec)
        results[spec] = {**eval_lib.summarize(cfg.benchmark.name, preds, rules),
                         "visual_tokens_kept": iv.tokens_kept(n_vis), "register_neurons": neurons,
                         "var_sink_dims": list(iv.var.sink_dims) if iv.var is not None else [],
                         "without_cls": iv.reduce.without_cls if iv.reduce is not None else None,
                         "vit_sinks_kept": sink_report.sink_share(params, share_batches,
                                                                  sink_report.kept_positions(m))}
        timed = batch if iv.reduce is None else eval_lib.prompt_batch(  # its fewer image tokens
            m, tokenizer, records[:cfg.eval.batch_size], cfg.eval)
        calls[spec] = (timing.prefill_call(m, params, timed),
                       timing.decode_call(m, params, timed, k.decode_steps))
    add_timings(results, calls, k.decode_steps)
    return results, not_run


def intervened(model, spec: str, iv, order_: str, rule):
    """``model`` with the interventions ``iv`` and the visual-token order ``order_`` (sinks by
    ``rule``). Raises NotRun when a token reduction does not fit the model's tower; exits when a
    DIYSink model refuses the order or rule (a configuration error, not a property of the spec)."""
    m = model.clone(visual_tokens=VisualTokenPolicy(order_, rule=rule), interventions=iv)
    try:
        m.policy  # a DIYSink model refuses orders / rules it does not apply
    except ValueError as e:
        raise SystemExit(f"error: intervention {spec}: {e}")
    try:
        m.check_reduction()  # a token reduction refuses towers it does not fit
    except ValueError as e:
        raise NotRun(str(e)) from e
    return m


def build_intervention(spec: str, model, params, records: list, rule, batch: dict, found: dict):
    """(Interventions, visual-token order, register neurons) of ``spec``
    (:func:`vitsink_jax.interventions.parse`) with what it searches on this model: the register
    neurons of ``registers:n`` over the benchmark's images (sinks by ``rule``), VAR's LLM sink
    dimensions on the timing ``batch`` (found once per run, kept in ``found``). Raises
    :class:`NotRun` for registers on a tower they do not fit and for VAR with no sink dimension."""
    try:
        iv, order, top = parse(spec)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if top and not model.config.vision.takes_test_time_registers:
        raise NotRun(f"test-time registers do not fit the {model.config.vision.model_type} tower")
    neurons = []
    if top:
        neurons = register_neurons(model, params, search_pixels(model.config, records), rule, top)
        iv = dataclasses.replace(iv, registers=TestTimeRegisters(tuple((at, n) for at, n, _ in neurons)))
    if iv.var is not None and iv.var.sinks == "dims" and not iv.var.sink_dims:
        if "var" not in found:  # found once on the timing batch, for every such spec
            found["var"] = llm_sink_dims(model, params, batch)
        iv = dataclasses.replace(iv, var=dataclasses.replace(iv.var, sink_dims=found["var"]))
        if not iv.var.sink_dims:
            raise NotRun("no LLM sink dimension (massive activation) on the timing batch")
    return iv, order, neurons


def pruning_curves(results: dict) -> dict:
    """{line: [(visual tokens kept, accuracy %)]} of the pruning plot: FastV and sink-aware
    pruning at each ratio, both lines starting from the stock model."""
    curves = {}
    for spec, r in results.items():
        name = spec.split(":")[0]
        if name in ("fastv", "fastv+sinks", "stock"):
            for line in (("fastv", "fastv+sinks") if name == "stock" else (name,)):
                curves.setdefault(line, []).append((r["visual_tokens_kept"], 100 * r["accuracy"]))
    return curves


def add_timings(results: dict, calls: dict, decode_steps: int) -> None:
    """Adds each intervention's prefill and decode-step time (``calls``: {spec: (prefill call,
    decode call of ``decode_steps`` steps)}, timed in turns, one call of each per round, so a slow
    spell of the machine hits all alike) and its time as x of the first spec's in the same round:
    ``prefill_vs_first`` (median over rounds; higher = slower) and ``prefill_vs_first_range``
    (min, max: the run's noise), likewise ``decode_vs_first``."""
    first = next(iter(calls))
    for index, name, ratio, per, repeats in ((0, "prefill_s", "prefill_vs_first", 1, 5),
                                              (1, "decode_step_s", "decode_vs_first", decode_steps, 3)):
        times = timing.interleaved_times({spec: c[index] for spec, c in calls.items()}, repeats)
        ratios = timing.time_ratios(times, first)
        for spec, r in results.items():
            r[name] = float(np.median(times[spec])) / per
            r[ratio], r[ratio + "_range"] = ratios[spec]["median"], [ratios[spec]["min"], ratios[spec]["max"]]


def time_ratio_cell(r: dict, key: str) -> str:
    """``median (min-max)`` of a time ratio over the timing rounds (``-`` when not measured)."""
    if r.get(key) is None:
        return "-"
    lo, hi = r.get(key + "_range") or (r[key], r[key])
    return f"{r[key]:.2f} ({lo:.2f}-{hi:.2f})"


def intervention_table(results: dict) -> str:
    """One row per intervention: tokens kept, the share of the images' ViT sinks kept
    (:mod:`vitsink_jax.interventions.report`), accuracy overall / per tag, prefill and
    decode-step time as x of the first (stock) spec's time (higher = slower; min-max over timing
    rounds)."""
    lines = ["\t".join(["intervention", "tokens kept", "ViT sinks kept", "overall", "tag:global",
                        "tag:local", "prefill x stock time (min-max)",
                        "decode step x stock time (min-max)"])]
    for spec, r in results.items():
        tags = [f"{100 * r['per_tag'][t]['acc']:.2f}" if t in r["per_tag"] else "-"
                for t in ("global", "local")]
        share = "-" if r.get("vit_sinks_kept") is None else f"{r['vit_sinks_kept']:.2f}"
        lines.append("\t".join([spec, str(r["visual_tokens_kept"]), share, f"{100 * r['accuracy']:.2f}", *tags,
                                time_ratio_cell(r, "prefill_vs_first"), time_ratio_cell(r, "decode_vs_first")]))
    return "\n".join(lines)
