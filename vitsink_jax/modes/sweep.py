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

import jax

from .. import eval_lib, plots
from ..convert.checkpoint_io import checkpoint_hash
from ..data.tokenizer import load_tokenizer
from ..outputs import write_json, write_jsonl
from ..provenance import file_stem, record
from ..sinks import detect
from .benchmark import comparison_table
from .common import (benchmark_records, benchmark_rules, drop_too_long, gather_predictions, load_lvlm,
                     parse_variant)



def run_sweep(cfg, workdir: Path) -> dict:
    """The paper's threshold-robustness study: sinks per image and benchmark accuracy across a
    sweep of tau and under the adaptive rule, for one variant (default sink-to-the-front; a
    DIYSink model: its own routing under each rule), beside the reference model as loaded (stock
    order; a DIYSink model: its trained rule). Writes sweep.json, the per-rule predictions and
    plots/tau_sweep.png."""
    ckpt, model, params = load_lvlm(cfg, workdir)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise SystemExit(f"error: {ckpt} has no tokenizer files; sweep mode needs the checkpoint's tokenizer")
    records, source, order = benchmark_records(cfg, workdir)
    records, too_long = drop_too_long(cfg, model, tokenizer, records, order)
    official_rules, rules = benchmark_rules(cfg), sweep_rules(cfg)
    what = "its DIYSink routing" if model.config.diysink else f"variant {cfg.sweep.variant!r}"
    print(f"sweep: {len(rules)} rule(s), {what}, against the reference model")

    def score(name, m):
        preds = gather_predictions(eval_lib.predict(m, params, tokenizer, records, cfg.eval,
                                                    cfg.eval.parallel), order)
        if jax.process_index() == 0:
            write_jsonl(workdir / f"{file_stem('predictions', name)}.jsonl", preds)
        return eval_lib.summarize(cfg.benchmark.name, preds, official_rules)

    reference = score("reference", model)
    if model.config.diysink is None:  # the stock order uses no rule: its count would mean nothing
        reference["sinks_per_image"] = None
    rows = {}
    for name, rule in rules.items():
        rows[name] = {**score(name, with_rule(model, cfg.sweep.variant, rule)),
                      "rule": dataclasses.asdict(rule)}
        rows[name]["vs_reference"] = rows[name]["accuracy"] - reference["accuracy"]
        sinks = rows[name]["sinks_per_image"]
        print(f"{name}: {'-' if sinks is None else f'{sinks:.2f}'} sinks/img, accuracy "
              f"{100 * rows[name]['accuracy']:.2f} ({100 * rows[name]['vs_reference']:+.2f} vs reference)")
    table = comparison_table([("reference", reference)] + list(rows.items()))
    print(table)
    taus = [n for n in rows if n.startswith("tau=")]
    adaptive = rows.get("adaptive")
    plot = plots.tau_sweep([rows[n]["rule"]["tau"] for n in taus], [100 * rows[n]["accuracy"] for n in taus],
                           [rows[n]["sinks_per_image"] for n in taus], 100 * reference["accuracy"],
                           None if adaptive is None else (100 * adaptive["accuracy"], adaptive["sinks_per_image"]),
                           workdir / "plots" / "tau_sweep.png")
    report = {**record(cfg, cfg.seed, str(ckpt), checkpoint_hash(ckpt)), "benchmark": cfg.benchmark.name,
              **source, "skipped_too_long": too_long,
              "variant": None if model.config.diysink else cfg.sweep.variant,
              "reference": reference, "results": rows, "table": table}
    if jax.process_index() == 0:
        out = write_json(workdir / "sweep.json", report)
        print(f"wrote {out} and {plot}")
    return report



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
