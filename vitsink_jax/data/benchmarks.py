"""Benchmark files as users have them on disk -> one record schema -> tfds builders.

Layouts read:
* VLMEvalKit TSV: ``index``, ``image`` (base64; a value of up to 64 characters that is another
  row's index refers to that row's image, as VLMEvalKit stores repeated images: resolved against
  every row of the file, before or after, kept or not), ``question``, option columns
  ``A``.. ``J``, ``answer``, ``category`` / ``l2-category``, optional ``hint``, ``image_path``,
  ``question_type``, ``answer_type``, ``choices``.
* lmms-eval style JSON (a list) or JSONL exports: the same field names, plus ``choices`` /
  ``options`` as a list (MMStar: the options written in the question, "Options: A: x, B: y"),
  ``l2_category`` for ``l2-category``, MME's ``question_id`` naming the image a question pair
  shares, an answer given as letter, ``(A)``, option text or option number, and ``image`` as
  base64 or as a path relative to the file.

Record schema (every benchmark, one dict per item)::

    index str | image bytes (encoded PNG/JPEG) | question str (hint prepended) |
    options list[str] ([] for yes/no and open questions) | answer str (letter for "mc",
    "yes"/"no" for "yesno", text for "open") | kind "mc"|"yesno"|"open" | category str |
    tag str ("global"/"local"/"mixed" or "") | group str (MME: the image the pair shares) |
    answer_type str ("text"/"integer"/"float") | meta dict (the row's fields among
    :data:`META_FIELDS` that the official scores break down by, e.g. MMStar ``l2-category``,
    CV-Bench ``source`` / ``split`` (2D / 3D), MathVista ``task`` / ``skills`` (a list) /
    ``question_type``; read from the row, then from an lmms-eval ``metadata`` dict; empty
    values left out; written to tfds as JSON text; a TSV row whose option cells VLMEvalKit's
    pandas reading changes, "3" -> "3.0" or an NA cell such as "None" dropped, also has
    ``vlmevalkit_choices`` {letter: text}, the choices VLMEvalKit's scorer matches against)

Bad input: a missing required column or an empty file raises :class:`BenchmarkError` naming
the file and field; a row whose image does not decode in full (a truncated JPEG fails here, not
at scoring), refers to no row or to a row whose image does not decode, or whose answer is not
among its options, or whose question, hint or options hold the ``<image>`` placeholder (the
prompt would get a second image's tokens) is skipped with a message naming file, row and field,
and counted in ``skipped``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import re
import sys
from pathlib import Path

import numpy as np

from .. import paths
from .preprocess import check_image
from .prompts import LETTERS
from .tfds_io import read_builder, write_builder
from .tokenizer import IMAGE_PLACEHOLDER

KINDS = ("mc", "yesno", "open")
# benchmark -> default kind of its items ("auto": mc when the row has options, else open)
BENCHMARKS = {"mmstar": "mc", "cvbench": "mc", "scienceqa": "mc", "mme": "yesno", "pope": "yesno",
              "mathvista": "auto", "gqa": "open", "embedded": "mc", "generic": "auto"}
FIELDS = ("index", "image", "question", "options", "answer", "kind", "category", "tag", "group",
          "answer_type", "meta")
# row fields kept in a record's meta (see vitsink_jax.scores for the breakdowns that use them)
META_FIELDS = ("split", "type", "source", "task", "l2-category", "skills", "question_type",
               "answer_option", "precision", "subject", "topic", "grade", "unit")


# pandas.read_csv's default NA strings (VLMEvalKit reads its TSVs with pandas): such a cell is NaN
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                       "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                       "nan", "null"})
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|Inf|INF)(?:inity)?")


def pandas_column(cells: list) -> list:
    """One TSV column's cells as VLMEvalKit sees them after ``pd.read_csv`` and ``str()``:
    None for a pandas NA string; a column whose other cells are all integers stays as written
    when it has no NA cell and becomes floats ("3" -> "3.0") when it has one; a column of numbers
    with a decimal point or exponent is floats ("2.50" -> "2.5"); any other column is text."""
    vals = [None if c is None or c in PANDAS_NA else c for c in cells]
    present = [v.strip() for v in vals if v is not None]
    if present and all(_INT.fullmatch(v) for v in present):
        if len(present) == len(vals):
            return [str(int(v)) for v in present]
        return [None if v is None else str(float(v)) for v in vals]
    if present and all(_FLOAT.fullmatch(v) for v in present):
        return [None if v is None else str(float(v)) for v in vals]
    return vals


def vlmevalkit_choices(rows: list) -> list:
    """Per TSV row, {letter: option text} as VLMEvalKit's ``can_infer`` gets it: the option
    columns (``A``.. present in the file) typed per column by :func:`pandas_column`, NA cells
    left out; None per row for a file without option columns."""
    letters = [c for c in LETTERS if rows and c in rows[0]]
    if not letters:
        return [None] * len(rows)
    columns = {c: pandas_column([row.get(c) for row in rows]) for c in letters}
    return [{c: columns[c][n] for c in letters if columns[c][n] is not None} for n in range(len(rows))]


class BenchmarkError(ValueError):
    """A benchmark file that cannot be used at all (the message names file and field)."""


class SkipRow(ValueError):
    """One unusable row (the message names the field); the reader skips and counts it."""


REFERENCE_CHARS = 64  # VLMEvalKit: an ``image`` of up to 64 characters is another row's index


def _image_bytes(value, base: Path) -> bytes:
    """A row's own ``image`` (bytes, HF's ``{"bytes": ..}``, a file relative to ``base``, or
    base64) -> its encoded bytes, decoded in full once as a check. Raises SkipRow (the reason)."""
    if isinstance(value, dict) and "bytes" in value:  # HF datasets' Image feature export
        value = value["bytes"]
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str) and len(value) < 256 and (base / value).is_file():
        raw = (base / value).read_bytes()
    else:
        try:
            raw = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as e:
            raise SkipRow(f"not an existing file and not base64 ({e})")
    try:
        check_image(raw)
    except ValueError as e:
        raise SkipRow(f"does not decode as an image ({e})")
    return raw


class RowImages:
    """The images of a file's raw rows, decoded on demand, each once (cached by row). A row
    whose ``image`` is another row's ``index`` (VLMEvalKit's repeated images) gets that row's
    image, whether that row comes before or after it, and whether it is kept or skipped for
    another field; the first row of an index is the one referred to. Any other value is the
    row's own image (see :func:`_image_bytes`); a reference is not followed further."""

    def __init__(self, rows: list, base: Path):
        self.values, self.base, self.cache = [row.get("image") for row in rows], base, {}
        self.by_index = {}  # row index -> row number (1-based)
        for n, row in enumerate(rows, start=1):
            if row.get("index") is not None:
                self.by_index.setdefault(str(row["index"]), n)

    def __call__(self, n: int) -> bytes:
        """The encoded image of row ``n`` (1-based). Raises SkipRow naming the field and, for a
        reference, the row referred to."""
        value = self.values[n - 1]
        short = isinstance(value, str) and len(value) <= REFERENCE_CHARS
        ref = self.by_index.get(value, n) if short else n
        try:
            if ref not in self.cache:
                self.cache[ref] = _image_bytes(self.values[ref - 1], self.base)
            return self.cache[ref]
        except SkipRow as e:
            where = (f"refers to row {ref} (index {value}), whose image: " if ref != n else
                     f"{value!r} (not another row's index): " if short else "")
            raise SkipRow(f"field 'image': {where}{e}") from None


_INLINE_OPTIONS = re.compile(r"\nOptions:\s*A:\s*(.*)$", re.DOTALL)
_NEXT_OPTION = re.compile(r",\s*[B-J]:\s")


def _question_options(question: str) -> list:
    """The options an lmms-eval MMStar question carries in its text ("...\nOptions: A: x,
    B: y, C: z, D: w"), [] when it has none."""
    m = _INLINE_OPTIONS.search(question)
    return [o.strip() for o in _NEXT_OPTION.split(m.group(1).strip())] if m else []


def _options(row: dict) -> list:
    """A row's option texts: a ``choices`` / ``options`` list, the option columns ``A``.. up to
    the first empty one, or else the options written in the question (lmms-eval's MMStar)."""
    for key in ("choices", "options"):
        v = row.get(key)
        if isinstance(v, str) and v.strip().startswith("["):
            v = ast.literal_eval(v)
        if isinstance(v, (list, tuple)) and v:
            return [str(o) for o in v]
    opts = []
    for letter in LETTERS:
        v = row.get(letter)
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() in ("", "nan"):
            break
        opts.append(str(v))
    return opts or _question_options(str(row.get("question", "")))


def _mc_answer(answer, options: list) -> str:
    a = str(answer).strip()
    if isinstance(answer, (int, np.integer)) and 0 <= int(answer) < len(options):
        return LETTERS[int(answer)]
    stripped = a.strip("()").strip()
    if len(stripped) == 1 and stripped.upper() in LETTERS[:len(options)]:
        return stripped.upper()
    if a in options:
        return LETTERS[options.index(a)]
    raise SkipRow(f"field 'answer': {a!r} is not a letter of, or equal to, one of the "
                  f"{len(options)} options {options}")


def _skills(value) -> list:
    """A MathVista ``skills`` value (a list, or a Python-list literal) -> [str]; other text is
    one skill (VLMEvalKit: ``eval(skills)``, [skills] on a SyntaxError)."""
    if isinstance(value, (list, tuple)):
        return [str(s) for s in value]
    try:
        v = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return [str(value)]
    return [str(s) for s in v] if isinstance(v, (list, tuple)) else [str(v)]


def _meta(row: dict, nested: dict) -> dict:
    """The row's :data:`META_FIELDS` (then the lmms-eval ``metadata`` dict's), empty ones left
    out; ``skills`` as a list of str, the others as str."""
    out = {}
    for key in META_FIELDS:
        v = row.get(key)
        v = row.get(key.replace("-", "_")) if v is None else v  # lmms-eval's l2_category
        v = nested.get(key) if v is None or str(v).strip() == "" else v
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() in ("", "nan", "None"):
            continue
        out[key] = _skills(v) if key == "skills" else str(v).strip()
    return out


def normalize_row(row: dict, benchmark: str, images: RowImages | None = None, n: int = 0) -> dict:
    """One raw row (TSV or JSON), row ``n`` (1-based) of the file ``images`` holds, -> a record
    of the schema above (``image`` b"" without ``images``: scoring predictions needs no pixels).
    Raises SkipRow."""
    kind = BENCHMARKS[benchmark]
    options = _options(row)
    if kind == "auto":
        kind = "mc" if options else "open"
    question = str(row["question"]).strip()
    hint = row.get("hint")
    if hint is not None and str(hint).strip() not in ("", "nan", "None"):
        question = f"Hint: {str(hint).strip()}\n{question}"
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    answer = row["answer"]
    if kind == "mc":
        if not options:
            raise SkipRow("field 'options': a multiple-choice row without options")
        # MathVista: VLMEvalKit's gold is the answer_option letter, not the letter of the answer text
        option = str(row.get("answer_option") or "").strip()
        answer = option if option in LETTERS[:len(options)] and option else _mc_answer(answer, options)
    elif kind == "yesno":
        answer = str(answer).strip().lower()
        if answer not in ("yes", "no"):
            raise SkipRow(f"field 'answer': {answer!r} is not yes or no")
        options = []
    else:
        answer, options = str(answer).strip(), []
    for field, text in [("question", question)] + [(f"option {o}", t) for o, t in zip(LETTERS, options)]:
        if IMAGE_PLACEHOLDER in text:  # would expand to a second image's tokens in the prompt
            raise SkipRow(f"field {field!r} holds the image placeholder {IMAGE_PLACEHOLDER!r}")
    category = row.get("category") or row.get("task") or meta.get("category") or ""
    return {"index": str(row.get("index", row.get("question_id", row.get("pid", "")))),
            "image": images(n) if images else b"",
            "question": question,
            "options": options, "answer": answer, "kind": kind, "category": str(category),
            "tag": str(row.get("tag") or ""),
            # MME: the image a question pair shares; lmms-eval's MME names it by question_id
            "group": str(row.get("image_path") or row.get("image_id") or row.get("imageId")
                         or (row.get("question_id") if benchmark == "mme" else "") or ""),
            "answer_type": str(row.get("answer_type") or meta.get("answer_type") or "text"),
            "meta": _meta(row, meta)}


def _raw_rows(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise BenchmarkError(f"{path}: the file is empty")
    if path.suffix == ".tsv":
        csv.field_size_limit(sys.maxsize)
        return list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        data = json.loads(text)
        return data if isinstance(data, list) else data.get("data", data.get("annotations", []))
    raise BenchmarkError(f"{path}: unknown benchmark file type {path.suffix!r} "
                         "(expected .tsv, .json or .jsonl)")


def read_benchmark(path, benchmark: str = "generic", verbose: bool = True,
                   decode_images: bool = True) -> tuple[list, list]:
    """A benchmark file -> (records, skipped), skipped = ["file:row N (index I): reason", ...].
    ``decode_images=False``: images are neither decoded nor checked (``image`` is b"")."""
    path = paths.path(path)
    if benchmark not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}")
    if not path.is_file():
        raise BenchmarkError(f"{path}: benchmark file not found")
    rows = _raw_rows(path)
    if not rows:
        raise BenchmarkError(f"{path}: no rows")
    for field in ("question", "answer", "image"):
        if field not in rows[0]:
            raise BenchmarkError(f"{path}: missing column {field!r} (has {sorted(rows[0])})")
    images = RowImages(rows, path.parent) if decode_images else None
    choices = vlmevalkit_choices(rows) if path.suffix == ".tsv" else [None] * len(rows)
    records, skipped = [], []
    for n, (row, typed) in enumerate(zip(rows, choices), start=1):
        try:
            rec = normalize_row(row, benchmark, images, n)
            if rec["kind"] == "mc" and typed is not None and typed != dict(zip(LETTERS, rec["options"])):
                rec["meta"]["vlmevalkit_choices"] = typed
        except SkipRow as e:
            skipped.append(f"{path}:row {n} (index {row.get('index', '?')}): {e}")
            if verbose:
                print(f"skipping {skipped[-1]}")
            continue
        records.append(rec)
    if not records:
        raise BenchmarkError(f"{path}: all {len(rows)} rows were skipped")
    return records, skipped


SCHEMA = {**{k: "text" for k in FIELDS}, "image": "bytes", "options": "text_list"}


def build_tfds(records: list, name: str, data_dir) -> Path:
    """Writes benchmark records as a tfds builder (array_record, no TensorFlow); see
    :mod:`vitsink_jax.data.tfds_io`; ``meta`` as JSON text."""
    return write_builder([{**r, "meta": json.dumps(r.get("meta", {}), sort_keys=True)} for r in records],
                         f"benchmark_{name}", data_dir, SCHEMA)


def load_tfds(name: str, data_dir, process_index: int = 0, process_count: int = 1) -> list:
    """This host's share of a benchmark builder, records in writing order."""
    records = read_builder(f"benchmark_{name}", data_dir, SCHEMA, process_index, process_count)
    return [{**r, "meta": json.loads(r["meta"] or "{}")} for r in records]
