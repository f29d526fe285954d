"""Finding 5's labels: a file that tags benchmark items global / local / mixed, joined by index.

The paper labelled 600 image-question pairs along two axes, image complexity and question
globalness, and split them into Global (low complexity, high globalness), Local (high
complexity, low globalness) and Mixed (everything else); accuracy is then reported per label for
each token selection (sink-only, non-sink-only, all). A labels file gives, per benchmark
``index``, either a ``tag`` column (global / local / mixed) or the two axes
``image_complexity`` and ``question_globalness`` (each low / high), from which the tag follows by
the paper's rule. Formats: .csv, .tsv, .json (a list of objects) or .jsonl.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

TAGS = ("global", "local", "mixed")
LEVELS = ("low", "high")


class LabelsError(ValueError):
    """A labels file that cannot be used (the message names the file, row and field)."""


def _rows(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".csv", ".tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv" else ","))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, list):
            return data
    raise LabelsError(f"{path}: expected a .csv / .tsv / .jsonl file or a .json list of objects")


def paper_tag(image_complexity: str, question_globalness: str) -> str:
    """The paper's split: low complexity + high globalness -> global; high complexity + low
    globalness -> local; otherwise mixed."""
    if (image_complexity, question_globalness) == ("low", "high"):
        return "global"
    if (image_complexity, question_globalness) == ("high", "low"):
        return "local"
    return "mixed"


def read_labels(path) -> dict:
    """{benchmark index: tag} from a labels file; LabelsError naming the file and row for a
    missing column, an unknown value or an index given twice."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"{path}: labels file not found")
    rows = _rows(path)
    if not rows:
        raise LabelsError(f"{path}: no rows")
    tags = {}
    for n, row in enumerate(rows, start=1):
        where = f"{path}:row {n}"
        if "index" not in row:
            raise LabelsError(f"{where}: no 'index' field (has {sorted(row)})")
        if row.get("tag") not in (None, ""):
            tag = str(row["tag"]).strip().lower()
            if tag not in TAGS:
                raise LabelsError(f"{where}: tag {row['tag']!r} not one of {TAGS}")
        else:
            axes = [str(row.get(k, "")).strip().lower() for k in ("image_complexity", "question_globalness")]
            if any(a not in LEVELS for a in axes):
                raise LabelsError(f"{where}: needs 'tag' ({'/'.join(TAGS)}) or 'image_complexity' and "
                                  f"'question_globalness' (each {'/'.join(LEVELS)}); got {axes}")
            tag = paper_tag(*axes)
        index = str(row["index"]).strip()
        if index in tags:
            raise LabelsError(f"{where}: index {index} is labelled twice")
        tags[index] = tag
    return tags


UNMATCHED_SHOWN = 5  # unmatched label indices named in the summary and the messages


def _shift_hint(indices: list, known: set) -> str:
    """A sentence when adding (or subtracting) one to every label index makes each a benchmark
    index (a file counted from 1 for a benchmark counted from 0, or the reverse), else ""."""
    try:
        numbers = [int(i) for i in indices]
    except ValueError:
        return ""
    for delta in (-1, 1):
        if numbers and all(str(i + delta) in known for i in numbers):
            return (f"every label index {'-' if delta < 0 else '+'} 1 is a benchmark index: the "
                    "labels file probably counts rows from a different start than the benchmark")
    return ""


def apply_labels(records: list, path) -> tuple[list, dict]:
    """(records with ``tag`` set from the labels file, a summary): every record whose index the
    file labels gets that tag, the others get "" (unlabelled: left out of the per-tag scores).
    The summary counts the labels whose index is no benchmark index, names the first
    :data:`UNMATCHED_SHOWN`, and says when shifting every label index by one would match them
    all (``shift_hint``). LabelsError, with the same details, when no label matches a record
    (the file belongs to another benchmark)."""
    tags = read_labels(path)
    out = [{**r, "tag": tags.get(str(r["index"]), "")} for r in records]
    labelled = sum(1 for r in out if r["tag"])
    known = {str(r["index"]) for r in records}
    unmatched = [i for i in tags if i not in known]
    hint = _shift_hint(list(tags), known) if unmatched else ""
    if not labelled:
        raise LabelsError(f"{path}: none of its {len(tags)} indices is a benchmark index "
                          f"(e.g. {sorted(tags)[:3]} vs {[r['index'] for r in records[:3]]})"
                          + (f"; {hint}" if hint else ""))
    summary = {"file": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
               "labelled": labelled, "unlabelled": len(out) - labelled,
               "labels_not_in_benchmark": len(unmatched),
               "labels_not_in_benchmark_first": unmatched[:UNMATCHED_SHOWN], "shift_hint": hint,
               "per_tag": {t: sum(1 for r in out if r["tag"] == t) for t in TAGS}}
    return out, summary


def summary_line(info: dict) -> str:
    """:func:`apply_labels`' summary as one printed line (the unmatched labels and the shift
    hint included when there are any)."""
    line = (f"labels {info['file']}: {info['labelled']} items tagged {info['per_tag']}, "
            f"{info['unlabelled']} unlabelled (left out of the per-tag scores)")
    if info["labels_not_in_benchmark"]:
        line += (f"; {info['labels_not_in_benchmark']} label(s) match no benchmark index, e.g. "
                 f"{', '.join(info['labels_not_in_benchmark_first'])}")
    return line + (f"; {info['shift_hint']}" if info["shift_hint"] else "")
