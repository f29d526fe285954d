"""Benchmark mode: visual-token variants side by side on one benchmark.

The embedded benchmark or a benchmark file (MMStar, CV-Bench, POPE, MME, ScienceQA, MathVista,
GQA, ...) scored for each configured visual-token variant of one checkpoint: the stock order
against the paper's training-free sink-to-the-front (Sec. 4.1, Table 1), and the token
selections of Finding 5 (Sec. 3.3, Fig. 5: sink-only / non-sink-only input, accuracy per
global / local / mixed tag); a DIYSink model (Sec. 4.2) routes its sinks itself and has one row.
The table is the paper's Table 1 layout (:func:`comparison_table`), with the benchmark owners'
numbers under ``official`` by the rule set score mode uses. Writes ``results.json`` and the
per-item ``predictions_<variant>.jsonl`` (``docs/benchmarks.md``).
"""

from __future__ import annotations

from pathlib import Path

import jax

from .. import eval_lib, scores
from ..diysink import routing_counts
from .common import (benchmark_records, benchmark_rules, checkpoint_record, drop_too_long, load_lvlm,
                     parse_variant, predict_benchmark, require_tokenizer, resolve_checkpoint, sink_rule,
                     write_results)


def run_benchmark(cfg, workdir: Path) -> dict:
    """The configured visual-token variants (``cfg.variants``) of one checkpoint scored side by
    side on the benchmark (:func:`score_variants`), printed as one table; returns and writes
    ``results.json``."""
    rules = benchmark_rules(cfg)  # a bad score.rules is refused before anything is loaded
    ckpt, how = resolve_checkpoint(cfg, workdir)
    records, source, order = benchmark_records(cfg, workdir)
    results, skipped_variants, too_long = score_variants(cfg, workdir, ckpt, records, order, None)
    table = comparison_table(list(results.items()))
    print(table)
    report = {**checkpoint_record(cfg, ckpt),
              "benchmark": cfg.benchmark.name, "file": cfg.benchmark.file, **source,
              "rules": rules, "skipped_too_long": too_long, "processes": jax.process_count(),
              "results": results,
              "skipped_variants": skipped_variants, "table": table}
    write_results(workdir / "results.json", report, " and per-item predictions_<variant>.jsonl")
    return report


def score_variants(cfg, workdir: Path, ckpt: Path, records: list, order: dict, rule,
                   label: str = "") -> tuple[dict, dict, dict]:
    """({variant: summary}, {skipped variant: why}, the rows skipped as too long for the model
    (:func:`drop_too_long`)) of one checkpoint over the benchmark records
    for every distinct configured visual-token variant (``eval_lib.distinct_variants``: a
    DIYSink model detects sinks by its own rule and has no "front" / "end" row); writes
    ``predictions_[<label>_]<variant>.jsonl``. With CoT routing a summary also counts the items
    per route and the unparsed routing answers (``cot_routing``). ``rule`` None: the configured
    one (:func:`sink_rule`). The official numbers follow :func:`benchmark_rules`."""
    rules = benchmark_rules(cfg)
    ckpt, model, params = load_lvlm(cfg, workdir, ckpt)
    rule = rule or sink_rule(cfg, model.config.vision)
    tokenizer = require_tokenizer(ckpt, "benchmark mode needs the checkpoint's tokenizer")
    records, too_long = drop_too_long(cfg, model, tokenizer, records, order)
    results = {}
    runs, skipped = variants_to_run(cfg, model, rule, ckpt)
    for spec, variant in runs:
        policy = variant.policy
        print(f"variant {spec}: order={policy.order} select={policy.select} "
              f"positions={policy.positions} (sink rule {policy.rule.rule}"
              f"{', DIYSink: sinks first through its sink projector' if model.config.diysink else ''})")
        preds = predict_benchmark(cfg, variant, params, tokenizer, records, order, workdir, label, spec)
        results[spec] = eval_lib.summarize(cfg.benchmark.name, preds, rules)
        routing = routing_counts(preds)
        if routing is not None:
            results[spec]["cot_routing"] = routing
            print(f"CoT routing: {routing['per_route']}; {routing['unparsed']} item(s) with an "
                  "unparsed answer (routed to both paths)")
    return results, skipped, too_long


def variants_to_run(cfg, model, rule, ckpt: Path) -> tuple[list, dict]:
    """([(spec, the model with that visual-token variant)], {skipped spec: why}) for the
    configured variants under ``rule`` (a DIYSink model's own rule instead: its projectors were
    trained on it), each distinct model once (:func:`vitsink_jax.eval_lib.distinct_variants`);
    prints the skipped ones, exits with an error when none applies."""
    if model.config.diysink is not None:  # its projectors were trained on its own rule
        rule = model.config.diysink.rule
    runs, skipped = eval_lib.distinct_variants(model, {s: parse_variant(s, rule) for s in cfg.variants})
    if not runs:
        raise SystemExit(f"error: none of the variants {tuple(cfg.variants)} applies to {ckpt}: "
                         f"{skipped}")
    for spec, why in skipped.items():
        print(f"variant {spec}: skipped ({why})")
    return runs, skipped


def comparison_table(rows: list) -> str:
    """Variants side by side (the paper's Table 1 layout): overall, per tag, per category."""
    tags = sorted({t for _, r in rows for t in r["per_tag"]})
    cats = sorted({c for _, r in rows for c in r["per_category"]})
    head = ["variant", "sinks/img", "overall"] + [f"tag:{t}" for t in tags] + cats
    lines = ["\t".join(head)]
    for spec, r in rows:
        sinks = "-" if r["sinks_per_image"] is None else f"{r['sinks_per_image']:.2f}"
        cells = [spec, sinks, f"{100 * r['accuracy']:.2f}"]
        cells += [f"{100 * r['per_tag'][t]['acc']:.2f}" if t in r["per_tag"] else "-" for t in tags]
        cells += [f"{100 * r['per_category'][c]['acc']:.2f}" if c in r["per_category"] else "-"
                  for c in cats]
        lines.append("\t".join(cells))
    for spec, r in rows:  # the benchmark owners' numbers, one block per variant
        if r.get("official"):
            lines.append(f"official {spec} ({r['official']['rule']}; percent):")
            lines += [f"  {line}" for line in scores.official_lines(r["official"])]
    return "\n".join(lines)
