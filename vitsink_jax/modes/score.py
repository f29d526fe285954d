"""Score mode: another system's predictions scored by the benchmark owners' rules; no model.

The predictions file (``score.predictions``: VLMEvalKit's .xlsx / .tsv / .csv, lmms-eval's
.jsonl samples) joined by index with the benchmark file, answers extracted by the owners'
judge-free rules (VLMEvalKit's or lmms-eval's, as the file's format says) and scored into the
``official`` numbers (:mod:`vitsink_jax.scores`), so a published model's outputs compare with
ours under the same rules (the paper's benchmarks and metrics, Sec. 7.2; ``docs/benchmarks.md``).
Writes ``results.json`` and ``scored_predictions.jsonl``.
"""

from __future__ import annotations

from pathlib import Path

from .. import scores
from ..data import benchmarks
from ..outputs import write_json, write_jsonl
from ..provenance import record


def run_score(cfg, workdir: Path) -> dict:
    """Score-only mode: another system's predictions (``cfg.score.predictions``: a VLMEvalKit
    .xlsx / .tsv / .csv with ``index`` and ``prediction``, or lmms-eval .jsonl samples) on the
    benchmark file, joined by index, answers extracted and scored by the rule set of the file's
    format (``cfg.score.rules``, :func:`vitsink_jax.scores.rules_for`: VLMEvalKit's judge-free
    rules for its .tsv files, lmms-eval's for its .json / .jsonl exports); writes
    ``results.json`` (provenance, the rule set, both files' sha256, join counts, unparsed answers, the
    ``official`` numbers) and ``scored_predictions.jsonl`` (per item the extracted answer and
    hit). No model is loaded."""
    b, s = cfg.benchmark, cfg.score
    if not b.file or not s.predictions:
        raise SystemExit("error: score mode needs --config.benchmark.file=<benchmark file> and "
                         "--config.score.predictions=<predictions file>")
    if b.name not in scores.OFFICIAL:
        raise SystemExit(f"error: benchmark {b.name!r} has no official rule here; score mode "
                         f"takes one of {', '.join(scores.OFFICIAL)}")
    try:
        rules = scores.rules_for(b.name, b.file, s.rules)
        records, skipped = benchmarks.read_benchmark(b.file, b.name, decode_images=False)
        items, counts = scores.join_predictions(records, scores.read_predictions(s.predictions),
                                                s.predictions, b.file, skipped, s.allow_subset)
        judged = scores.judge_all(b.name, items, rules)
        official = scores.official(b.name, items, judged, rules)
    except ValueError as e:  # BenchmarkError, PredictionError, an item without a rule
        raise SystemExit(f"error: {e}")
    table = "\n".join([f"official {b.name} ({official['rule']}; percent), {s.predictions}:",
                       *(f"  {line}" for line in scores.official_lines(official))])
    print(table)
    report = {**record(cfg, cfg.seed), "benchmark": b.name, "file": b.file,
              "file_sha256": scores.file_sha256(b.file), "predictions": s.predictions,
              "predictions_sha256": scores.file_sha256(s.predictions), "skipped_rows": skipped,
              "rules": rules,
              "counts": counts, "unparsed": official["unparsed"], "official": official, "table": table}
    out = write_json(workdir / "results.json", report)
    write_jsonl(workdir / "scored_predictions.jsonl",
                [{"index": it["index"], "prediction": it["response"], "answer": it["answer"], **j}
                 for it, j in zip(items, judged)])
    print(f"{counts['matched']} of {counts['benchmark_rows']} rows scored, {official['unparsed']} "
          f"answer(s) unparsed; wrote {out} and {workdir / 'scored_predictions.jsonl'}")
    return report
