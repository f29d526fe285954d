"""Sweep mode: the paper's threshold-robustness study (its appendix; the adaptive norm-drop
rule, Sec. 2).

Sinks per image and benchmark accuracy across a sweep of tau (``sweep.taus``) and under the
adaptive rule, for one variant (default sink-to-the-front, Sec. 4.1; a DIYSink model: its own
routing under each rule), beside the reference model as loaded (stock order; a DIYSink model:
its trained rule). Writes ``sweep.json``, the per-rule predictions and ``plots/tau_sweep.png``
(``docs/benchmarks.md``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import eval_lib, plots
from ..sinks import detect
from .benchmark import comparison_table
from .common import (benchmark_records, benchmark_rules, checkpoint_record, drop_too_long, load_lvlm,
                     parse_variant, predict_benchmark, require_tokenizer, write_results)


def run_sweep(cfg, workdir: Path) -> dict:
    """The paper's threshold-robustness study: sinks per image and benchmark accuracy across a
    sweep of tau and under the adaptive rule, for one variant (default sink-to-the-front; a
    DIYSink model: its own routing under each rule), beside the reference model as loaded (stock
    order; a DIYSink model: its trained rule). Writes sweep.json, the per-rule predictions and
    plots/tau_sweep.png."""
    ckpt, model, params = load_lvlm(cfg, workdir)
    tokenizer = require_tokenizer(ckpt, "sweep mode needs the checkpoint's tokenizer")
    records, source, order = benchmark_records(cfg, workdir)
    records, too_long = drop_too_long(cfg, model, tokenizer, records, order)
    official_rules, rules = benchmark_rules(cfg), sweep_rules(cfg)
    what = "its DIYSink routing" if model.config.diysink else f"variant {cfg.sweep.variant!r}"
    print(f"sweep: {len(rules)} rule(s), {what}, against the reference model")

    def score(name, m):
        preds = predict_benchmark(cfg, m, params, tokenizer, records, order, workdir, name)
        return eval_lib.summarize(cfg.benchmark.name, preds, official_rules)

    reference = score("reference", model)
    if model.config.diysink is None:  # the stock order uses no rule: its count would mean nothing
        reference["sinks_per_image"] = None
    rows = {name: rule_row(name, score(name, with_rule(model, cfg.sweep.variant, rule)), rule, reference)
            for name, rule in rules.items()}
    table = comparison_table([("reference", reference)] + list(rows.items()))
    print(table)
    plot = plot_sweep(rows, reference, workdir / "plots" / "tau_sweep.png")
    report = {**checkpoint_record(cfg, ckpt), "benchmark": cfg.benchmark.name,
              **source, "skipped_too_long": too_long,
              "variant": None if model.config.diysink else cfg.sweep.variant,
              "reference": reference, "results": rows, "table": table}
    write_results(workdir / "sweep.json", report, f" and {plot}")
    return report


def rule_row(name: str, summary: dict, rule, reference: dict) -> dict:
    """sweep.json's row of one swept rule: its benchmark summary, the rule and its accuracy less
    the reference's (``vs_reference``); printed as one line."""
    row = {**summary, "rule": dataclasses.asdict(rule),
           "vs_reference": summary["accuracy"] - reference["accuracy"]}
    sinks = row["sinks_per_image"]
    print(f"{name}: {'-' if sinks is None else f'{sinks:.2f}'} sinks/img, accuracy "
          f"{100 * row['accuracy']:.2f} ({100 * row['vs_reference']:+.2f} vs reference)")
    return row


def plot_sweep(rows: dict, reference: dict, path: Path) -> Path:
    """plots/tau_sweep.png: accuracy and sinks per image against tau for the ``tau=`` rows, the
    reference's accuracy and the adaptive rule's point (when swept)."""
    taus = [n for n in rows if n.startswith("tau=")]
    adaptive = rows.get("adaptive")
    return plots.tau_sweep([rows[n]["rule"]["tau"] for n in taus], [100 * rows[n]["accuracy"] for n in taus],
                           [rows[n]["sinks_per_image"] for n in taus], 100 * reference["accuracy"],
                           None if adaptive is None else (100 * adaptive["accuracy"], adaptive["sinks_per_image"]),
                           path)


def sweep_rules(cfg) -> dict:
    """{row name: SinkRule} of the threshold sweep: ``tau=<t>`` for each of ``cfg.sweep.taus``,
    then ``adaptive`` when ``cfg.sweep.adaptive``; the other rule parameters from ``cfg.sink``."""
    rules = {f"tau={t:g}": detect.SinkRule(**{**cfg.sink, "rule": "threshold", "tau": float(t)})
             for t in cfg.sweep.taus}
    if cfg.sweep.adaptive:
        rules["adaptive"] = detect.SinkRule(**{**cfg.sink, "rule": "adaptive"})
    if not rules:
        raise SystemExit("error: sweep.taus is empty and sweep.adaptive is off: nothing to sweep")
    return rules


def with_rule(model, variant: str, rule):
    """The model whose sinks follow ``rule``: a DIYSink model with ``rule`` routing tokens to
    its two projectors (its own variant), any other with ``variant`` (e.g. sink-to-the-front)."""
    c = model.config
    if c.diysink is not None:
        return model.clone(config=dataclasses.replace(c, diysink=dataclasses.replace(c.diysink, rule=rule)))
    return model.clone(visual_tokens=parse_variant(variant, rule))
