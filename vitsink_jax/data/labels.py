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


def apply_labels(records: list, path) -> tuple[list, dict]:
    """(records with ``tag`` set from the labels file, a summary): every record whose index the
    file labels gets that tag, the others get "" (unlabelled: left out of the per-tag scores).
    LabelsError when no label matches a record (the file belongs to another benchmark)."""
    tags = read_labels(path)
    out = [{**r, "tag": tags.get(str(r["index"]), "")} for r in records]
    labelled = sum(1 for r in out if r["tag"])
    if not labelled:
        raise LabelsError(f"{path}: none of its {len(tags)} indices is a benchmark index "
                          f"(e.g. {sorted(tags)[:3]} vs {[r['index'] for r in records[:3]]})")
    known = {str(r["index"]) for r in records}
    summary = {"file": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
               "labelled": labelled, "unlabelled": len(out) - labelled,
               "labels_not_in_benchmark": sum(1 for i in tags if i not in known),
               "per_tag": {t: sum(1 for r in out if r["tag"] == t) for t in TAGS}}
    return out, summary
