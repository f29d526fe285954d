"""Benchmark scores as the benchmark owners compute them, and answer extraction.

Two kinds of answer extraction live here:

* Our own generation path (:func:`extract_choice`, :func:`extract_yes_no`, :func:`open_match`,
  :func:`normalize_answer`): lenient rules used for ``accuracy`` / ``per_category`` in
  ``eval_lib.predict``.
* VLMEvalKit's judge-free "exact matching" (open-compass/VLMEvalKit at e8e78f05f308, read from
  its code; /work/shared/benchmarks/VLMEVALKIT_RULES.md): :func:`can_infer` (multiple choice,
  ``vlmeval/utils/matching_util.py``), :func:`yes_or_no` (``YOrN_Extraction`` with
  ``process_punctuation``, ``vlmeval/dataset/utils/yorn.py``, ``vlmeval/smp/misc.py``) and the
  MathVista prefetch check (``post_check(prefetch=True)``, ``vlmeval/dataset/utils/mathvista.py``).
  VLMEvalKit falls back to an LLM judge for answers these rules cannot read; here such an answer
  stays unread (multiple choice ``Z``, yes/no ``Unknown``, MathVista not prefetched) and counts
  as wrong, which is what VLMEvalKit does under ``--judge exact_matching``.

lmms-eval's rules (EvolvingLMMs-Lab/lmms-eval, ``lmms_eval/tasks/{pope,mme,mmstar}/utils.py``)
score lmms-eval's own files (:func:`rules_for`; :data:`LMMS_EVAL`): POPE counts an answer only
when it is exactly "yes" / "no" after lower-casing; MME reads yes / no from the first four
characters and pairs questions by ``question_id``, totals over the categories present; MMStar's
``exact_match`` reads the letter at the answer's start and averages per-``l2_category``
accuracies.

:func:`official` gives the official numbers of one benchmark, all in percent (VLMEvalKit's
multiple-choice tables hold fractions 0-1; they are x 100 here):

* ``pope`` - VLMEvalKit ``POPE_rating``: rows whose ``category`` lists several splits
  (``adversarial,popular``) are exploded, one row per split (names stripped of surrounding
  spaces, which VLMEvalKit keeps), before anything is counted, so such a row counts once per
  split in the split rows *and* in Overall. Per split and Overall:
  ``f1`` (VLMEvalKit's column "Overall"), ``acc``, ``precision``, ``recall`` with "Yes" the
  positive class and an unread answer a "No"; ``yes_ratio`` (share of "Yes" answers) is the
  original POPE paper's (Li et al., 2023), which VLMEvalKit does not report.
* ``mme`` - VLMEvalKit ``MME_rating``: per category ``acc`` (over questions) and ``acc_plus``
  (over images, an image counts when its first two questions are right, as VLMEvalKit's
  ``val[0] * val[1]``; images are the rows' ``image_path``; None when an image has one question,
  where VLMEvalKit raises IndexError), ``score = acc + acc_plus`` (at most 200); ``perception`` = the sum over
  OCR, artwork, celebrity, color, count, existence, landmark, position, posters, scene (at most
  2000) and ``reasoning`` = the sum over code_reasoning, commonsense_reasoning,
  numerical_calculation, text_translation (at most 800); a total is None, with the missing
  categories listed, when one of its categories is absent (VLMEvalKit raises KeyError).
* ``cvbench`` - VLMEvalKit ``CVBench``: ``2D`` = the unweighted mean over sources (ADE20K, COCO)
  of the per-source accuracy of the 2D rows (``CVBench.report_accuracy``); ``3D`` = the accuracy
  over the 3D rows (``report_acc``; every 3D row is Omni3D, so this is also Cambrian's Omni3D
  accuracy); ``Overall`` = (2D + 3D) / 2, Cambrian-1's CV-Bench score (the CV-Bench dataset
  card; VLMEvalKit reports 2D and 3D separately). Also per source, per task (``category`` /
  ``task``) and ``pooled`` (plain accuracy over all rows, not an official number).
* ``mmstar``, ``scienceqa`` - VLMEvalKit ``report_acc``: ``Overall`` and the accuracy per
  ``l2-category`` and per ``category`` value (and per ``split`` when the file has that column).
* ``mathvista`` - VLMEvalKit ``MathVista_acc`` without its GPT judge: a multiple-choice row is
  prefetched when :func:`can_infer` reads any letter and right when it is ``answer_option``; an
  integer / float row is prefetched (and right) when ``int(prediction) == int(answer)`` /
  ``float(...) == float(...)`` on the whole string (an answer equal to 0 never prefetches: it is
  falsy); text / list rows never prefetch. Per Overall, task and skill: ``tot``, ``prefetch``,
  ``hit``, ``prefetch_rate``, ``acc``. Rows the judge would have read count as wrong, so ``acc``
  is a lower bound of VLMEvalKit's judged accuracy.

pandas' typing of whole option columns when VLMEvalKit loads a TSV (a column of integers with
an empty cell is read as floats, so "3" becomes "3.0" before matching; an NA cell such as "None"
is no choice) is applied: the record's ``meta["vlmevalkit_choices"]``
(:func:`vitsink_jax.data.benchmarks.vlmevalkit_choices`). Predictions are taken as the cell
text; pandas' NA strings ("", "NA", "None", "null", ...) do
become the string "nan" (:func:`read_predictions`), as VLMEvalKit's ``str(prediction)`` sees them.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
import string
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from . import paths
from .data.benchmarks import PANDAS_NA
from .data.prompts import LETTERS

OFFICIAL = ("pope", "mme", "cvbench", "mmstar", "scienceqa", "mathvista")
RULES = {
    "pope": "VLMEvalKit POPE_rating (vlmeval/dataset/utils/yorn.py), exact matching",
    "mme": "VLMEvalKit MME_rating (vlmeval/dataset/utils/yorn.py), exact matching",
    "cvbench": "VLMEvalKit CVBench (vlmeval/dataset/image_mcq.py) + Cambrian-1 overall, exact matching",
    "mmstar": "VLMEvalKit report_acc (vlmeval/dataset/utils/multiple_choice.py), exact matching",
    "scienceqa": "VLMEvalKit report_acc (vlmeval/dataset/utils/multiple_choice.py), exact matching",
    "mathvista": "VLMEvalKit MathVista_acc (vlmeval/dataset/utils/mathvista.py), prefetch only (no judge)",
}
MME_CATEGORIES = {
    "perception": ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark",
                   "position", "posters", "scene"),
    "reasoning": ("code_reasoning", "commonsense_reasoning", "numerical_calculation",
                  "text_translation"),
}


class PredictionError(ValueError):
    """A predictions file that cannot be scored (the message names file, column or index)."""


# ---------------------------------------------------------- our generation path's rules ---

def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (VQA-style normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def extract_choice(text: str, options: list) -> str:
    """The option letter a free-form answer names, or "" when none can be read (lenient: a
    leading letter, "answer is X", or the one option text it contains)."""
    letters = LETTERS[:len(options)]
    m = re.match(rf"^\W*\(?([{letters}])\)?(?:[.:)\s]|$)", text.strip())
    if m is None:
        m = re.search(rf"answer is\W*\(?([{letters}])\b", text, re.IGNORECASE)
    if m:
        return m.group(1)
    norm = normalize_answer(text)
    hits = [LETTERS[i] for i, o in enumerate(options) if normalize_answer(o) and normalize_answer(o) in norm]
    return hits[0] if len(hits) == 1 else ""


def extract_yes_no(text: str) -> str:
    """"yes" / "no" when the answer's first word is one, else ""."""
    words = normalize_answer(text).split()
    return words[0] if words and words[0] in ("yes", "no") else ""


def open_match(pred: str, gold: str, answer_type: str = "text") -> bool:
    """Normalised exact match; numbers (answer_type integer/float, or a numeric gold) compared
    as numbers at the gold answer's precision."""
    try:
        g = float(gold)
    except ValueError:
        return normalize_answer(pred) == normalize_answer(gold)
    m = re.search(r"-?\d+(?:\.\d+)?", pred.replace(",", ""))
    if m is None:
        return False
    decimals = len(gold.split(".")[1]) if "." in gold else 0
    return round(float(m.group(0)), decimals) == round(g, decimals)


# ------------------------------------------------------- VLMEvalKit's exact matching ---

REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
_OPTION_PUNCT = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(text: str, letters) -> str:
    """VLMEvalKit ``can_infer_option``: the letter a prediction names, "Z" (a refusal, or a lone
    token Z), or "" (none). ``letters``: the choice letters, e.g. "ABCD"."""
    if "Failed to obtain answer via API" in text:
        return ""
    if any(r in text for r in REFUSALS):
        return "Z"
    tokens = text.translate(_OPTION_PUNCT).split()
    present = [c for c in letters if c in tokens]
    if len(present) == 1:
        if tokens.index(present[0]) > len(tokens) - 5:  # among the last 4 tokens
            return present[0]
    elif not present and "Z" in tokens:
        return "Z"
    m = _VERBOSE_ANSWER.search(text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return ""


def can_infer_text(text: str, choices: dict) -> str:
    """VLMEvalKit ``can_infer_text``: the letter of the one option text (lower case) contained in
    the lower-cased prediction, if that is at most twice as long as all option texts together."""
    low = text.lower()
    if len(low) > 2 * sum(len(str(v)) for v in choices.values()):
        return ""
    hits = [k for k, v in choices.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else ""


def can_infer(text: str, choices: dict) -> str:
    """VLMEvalKit ``can_infer``: ``choices`` {letter: option text}; the letter, "Z" or ""."""
    text = str(text)
    return can_infer_option(text, list(choices)) or can_infer_text(text, choices)


def process_punctuation(text: str) -> str:
    """VLMEvalKit ``process_punctuation`` (VQA-style): each mark is removed if the text has it
    next to a space (or the text has a digit,digit comma), else replaced by a space; periods not
    between digits are removed, at most 32 (``re.UNICODE`` passed as the count)."""
    out = text
    comma = re.search(r"(\d)(,)(\d)", text) is not None
    for p in [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!"]:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or comma) else " ")
    return re.sub(r"(?<!\d)\.(?!\d)", "", out, count=int(re.UNICODE))


def yes_or_no(text: str) -> str:
    """VLMEvalKit ``YOrN_Extraction``: "Yes" if the word yes occurs and no does not, "No" the
    other way round, else "Unknown"."""
    words = process_punctuation(str(text).lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def _mathvista_prefetch(item: dict, response: str) -> dict:
    """VLMEvalKit ``post_check(prefetch=True)`` and, without a judge, the resulting hit."""
    if item["kind"] == "mc":
        letter = can_infer(response, dict(zip(LETTERS, item["options"])))
        return {"extracted": letter, "prefetch": bool(letter), "hit": letter == item["answer"],
                "parsed": bool(letter)}
    cast = {"integer": int, "float": float}.get(item["answer_type"])
    value = None
    if cast is not None:
        try:
            value = cast(response)
            ok = value == cast(item["answer"])
        except ValueError:
            ok = False
    else:  # text / list: VLMEvalKit compares str(None) with the answer
        ok = False
    ok = bool(ok and value)  # a prefetched 0 is falsy: it goes to the judge
    return {"extracted": "" if value is None else str(value), "prefetch": ok, "hit": ok, "parsed": ok}


def judge(benchmark: str, item: dict) -> dict:
    """One item under VLMEvalKit's exact matching.

    Args:
      benchmark: one of :data:`OFFICIAL`.
      item: a benchmark record (``index``, ``kind``, ``options``, ``answer``, ``answer_type``)
        with ``response`` (str): the model's raw answer.
    Returns:
      {"extracted": str (letter / "Z"; "Yes" / "No" / "Unknown"; the number read),
      "hit": bool, "parsed": bool (the rule read an answer), and for MathVista "prefetch": bool}.
    """
    response = str(item["response"])
    if benchmark == "mathvista":
        return _mathvista_prefetch(item, response)
    if item["kind"] == "mc":  # the choices as VLMEvalKit's pandas reading typed them, if it did
        choices = item["meta"].get("vlmevalkit_choices") or dict(zip(LETTERS, item["options"]))
        letter = can_infer(response, choices) or "Z"
        return {"extracted": letter, "hit": letter == item["answer"], "parsed": letter in choices}
    if item["kind"] == "yesno":
        yn = yes_or_no(response)
        return {"extracted": yn, "hit": yn.lower() == item["answer"].lower(), "parsed": yn != "Unknown"}
    raise ValueError(f"{benchmark}: item {item['index']!r} is a {item['kind']!r} question, "
                     "which has no judge-free rule")


# ----------------------------------------------------------------------- official ---

def _pct(hits) -> float | None:
    """100 x the mean of booleans, None when there are none."""
    return float(100 * np.mean(hits)) if len(hits) else None


def _groups(items: list, keys) -> dict:
    """{group name: [item positions]} where ``keys(item)`` lists an item's groups (empty names
    left out); names sorted."""
    out = defaultdict(list)
    for i, item in enumerate(items):
        for k in keys(item):
            if k:
                out[k].append(i)
    return dict(sorted(out.items()))


def _acc_by(items: list, hits: np.ndarray, keys) -> dict:
    """{group: accuracy in percent} for :func:`_groups`."""
    return {k: _pct(hits[ix]) for k, ix in _groups(items, keys).items()}


def _pope_metrics(answers: np.ndarray, extracted: np.ndarray, hits: np.ndarray) -> dict:
    """POPE_rating's numbers for rows with gold Yes (``answers``) and predicted Yes
    (``extracted``), all bool [N]."""
    tp = int(np.sum(answers & extracted))
    fp, fn = int(np.sum(~answers & extracted)), int(np.sum(answers & ~extracted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": 100 * f1, "acc": _pct(hits), "precision": 100 * precision,
            "recall": 100 * recall, "yes_ratio": _pct(extracted), "n": int(len(hits))}


def _pope(items, judged, hits) -> dict:
    # explode: one row per listed split; Overall counts the exploded rows
    rows = [(i, s.strip()) for i, it in enumerate(items) for s in (it["category"] or "").split(",")]
    pos = np.array([i for i, _ in rows])
    answers = np.array([items[i]["answer"].lower() == "yes" for i in pos])
    said_yes = np.array([judged[i]["extracted"] == "Yes" for i in pos])
    split_of = np.array([s for _, s in rows])
    res = {"Overall": _pope_metrics(answers, said_yes, hits[pos]), "splits": {}}
    for s in sorted(set(split_of) - {""}):
        m = split_of == s
        res["splits"][s] = _pope_metrics(answers[m], said_yes[m], hits[pos][m])
    return res


def _mme(items, judged, hits) -> dict:
    cats = {}
    for cat, ix in _groups(items, lambda it: [it["category"]]).items():
        images = defaultdict(list)
        for i in ix:
            images[items[i]["group"]].append(bool(hits[i]))
        acc = _pct(hits[ix])
        # VLMEvalKit: an image counts when its first two questions are right (val[0] * val[1])
        short = "" in images or any(len(v) < 2 for v in images.values())
        plus = None if short else _pct([v[0] and v[1] for v in images.values()])
        cats[cat] = {"acc": acc, "acc_plus": plus, "score": None if plus is None else acc + plus,
                     "n": len(ix), "images": len(images)}
    res = {"categories": cats}
    for total, names in MME_CATEGORIES.items():
        missing = [c for c in names if c not in cats]
        scores_ = [cats[c]["score"] for c in names if c in cats]
        res[total] = None if missing or None in scores_ else float(sum(scores_))
        if missing:
            res[f"{total}_missing_categories"] = missing
    if any(c["acc_plus"] is None for c in cats.values()):
        res["note"] = ("acc+ needs each row's image_path (the record's group) and two questions "
                       "per image; some rows have none, or an image has one question")
    return res


def _split(item) -> str:
    return item["meta"].get("split") or item["meta"].get("type") or ""


def _cvbench(items, judged, hits) -> dict:
    split = np.array([_split(it) for it in items])
    res = {"pooled": _pct(hits), "sources": _acc_by(items, hits, lambda it: [it["meta"].get("source")]),
           "tasks": _acc_by(items, hits, lambda it: [it["category"] or it["meta"].get("task")])}
    two = [items[i] for i in np.flatnonzero(split == "2D")]
    by_source = _acc_by(two, hits[split == "2D"], lambda it: [it["meta"].get("source")])
    sourced = all(it["meta"].get("source") for it in two)
    res["2D"] = float(np.mean(list(by_source.values()))) if two and sourced else None
    res["3D"] = _pct(hits[split == "3D"])
    res["Overall"] = None if res["2D"] is None or res["3D"] is None else (res["2D"] + res["3D"]) / 2
    if (split == "").any():
        res["note"] = "rows without a split / type column value (2D or 3D) count only in pooled"
    elif two and not sourced:
        res["note"] = "2D needs every 2D row's source column"
    return res


def _report_acc(items, judged, hits) -> dict:
    res = {"Overall": _pct(hits)}
    if all(it["meta"].get("split") for it in items):
        res["splits"] = _acc_by(items, hits, lambda it: [it["meta"]["split"]])
    res["l2-category"] = _acc_by(items, hits, lambda it: [it["meta"].get("l2-category")])
    res["category"] = _acc_by(items, hits, lambda it: [it["category"]])
    return res


def _mathvista(items, judged, hits) -> dict:
    fetched = np.array([j["prefetch"] for j in judged], bool)

    def block(ix) -> dict:
        return {"tot": len(ix), "prefetch": int(fetched[ix].sum()), "hit": int(hits[ix].sum()),
                "prefetch_rate": _pct(fetched[ix]), "acc": _pct(hits[ix])}

    return {"Overall": block(np.arange(len(items))),
            "task": {k: block(ix) for k, ix in _groups(
                items, lambda it: [it["meta"].get("task") or it["category"]]).items()},
            "skill": {k: block(ix) for k, ix in _groups(
                items, lambda it: it["meta"].get("skills") or []).items()},
            "judge": "none: rows VLMEvalKit's GPT judge would read count as wrong"}


_AGGREGATE = {"pope": _pope, "mme": _mme, "cvbench": _cvbench, "mmstar": _report_acc,
              "scienceqa": _report_acc, "mathvista": _mathvista}


# ------------------------------------------------------------------ lmms-eval's rules ---

def _lmms_pope_judge(item: dict, response: str) -> dict:
    """lmms-eval ``pope_process_results``: the whole answer, lower-cased and stripped, must be
    the gold "yes" / "no"."""
    pred = response.lower().strip()
    return {"extracted": pred, "hit": pred == item["answer"].lower(), "parsed": pred in ("yes", "no")}


def _lmms_mme_judge(item: dict, response: str) -> dict:
    """lmms-eval ``parse_pred_ans`` (from Otter): lower-cased, stripped, periods removed; "yes"
    / "no" as is, a lone "y" / "n", else "yes" or "no" within the first four characters (yes
    first), else "other"."""
    pred = response.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        label = pred
    elif len(pred) == 1:
        label = {"y": "yes", "n": "no"}.get(pred, "other")
    else:
        label = "yes" if "yes" in pred[:4] else "no" if "no" in pred[:4] else "other"
    return {"extracted": label, "hit": label == item["answer"].lower(), "parsed": label != "other"}


def _lmms_mmstar_judge(item: dict, response: str) -> dict:
    """lmms-eval MMStar ``exact_match``: the gold letter is the answer's first character, or
    the one after "(", "option " or "the answer is " at its start (all lower-cased)."""
    pred = response.lower().strip().replace("\n", " ")
    read = [pred[:1]] + [pred[len(p):len(p) + 1] for p in ("(", "option ", "the answer is ")
                         if pred.startswith(p)]
    gold = item["answer"].lower()
    letter = gold if gold in read else read[0]
    return {"extracted": letter.upper(), "hit": gold in read,
            "parsed": letter.upper() in LETTERS[:len(item["options"])]}


def _lmms_pope(items, judged, hits) -> dict:
    """lmms-eval POPE: accuracy, precision (TP / (TP + FP)), recall (TP / (TP + FN), FN only
    for a gold yes answered exactly "no"), F1 and its ``yes_ratio`` (the share of *gold* yes
    answers, as lmms-eval computes it), over all rows and per ``category`` (lmms-eval's
    pope_adv / pope_pop / pope_random tasks)."""
    def metrics(ix) -> dict:
        gold = [items[i]["answer"].lower() for i in ix]
        pred = [judged[i]["extracted"] for i in ix]
        tp = sum(g == p == "yes" for g, p in zip(gold, pred))
        fp = sum(g == "no" and p == "yes" for g, p in zip(gold, pred))
        fn = sum(g == "yes" and p == "no" for g, p in zip(gold, pred))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"f1": 100 * f1, "acc": _pct(hits[ix]), "precision": 100 * precision,
                "recall": 100 * recall, "yes_ratio": _pct([g == "yes" for g in gold]), "n": len(ix)}

    return {"Overall": metrics(list(range(len(items)))),
            "splits": {k: metrics(ix) for k, ix in _groups(items, lambda it: [it["category"]]).items()}}


def _lmms_mme(items, judged, hits) -> dict:
    """lmms-eval ``mme_aggregate_results``: per category, the mean over question_ids (the
    record's ``group``) of acc (the pair's mean) + acc+ (both right), each in percent; a
    question_id without exactly two questions leaves its category's score None (lmms-eval
    asserts two); ``perception`` / ``reasoning`` (lmms-eval's cognition) = the sum over the
    categories present."""
    cats, notes = {}, []
    for cat, ix in _groups(items, lambda it: [it["category"]]).items():
        pairs = defaultdict(list)
        for i in ix:
            pairs[items[i]["group"]].append(bool(hits[i]))
        bad = [g for g, v in pairs.items() if len(v) != 2 or not g]
        if bad:
            notes.append(f"{cat}: question_id {bad[0]!r} has {len(pairs[bad[0]])} question(s), not 2")
        acc = _pct([np.mean(v) for v in pairs.values()])
        plus = _pct([all(v) for v in pairs.values()])
        cats[cat] = {"acc": acc, "acc_plus": plus, "score": None if bad else acc + plus,
                     "n": len(ix), "images": len(pairs)}
    res = {"categories": cats}
    for total, names in MME_CATEGORIES.items():
        scores_ = [cats[c]["score"] for c in names if c in cats]
        res[total] = None if not scores_ or None in scores_ else float(sum(scores_))
    if notes:
        res["note"] = "; ".join(notes)
    return res


def _lmms_mmstar(items, judged, hits) -> dict:
    """lmms-eval ``mmstar_aggregate_results``: per ``category`` and for ``average`` (all rows),
    the unweighted mean over ``l2-category`` values of each one's accuracy; also each
    ``l2-category``'s accuracy."""
    l2 = _acc_by(items, hits, lambda it: [it["meta"].get("l2-category", "")])

    def mean_l2(ix) -> float:
        return float(np.mean(list(_acc_by([items[i] for i in ix], hits[ix],
                                          lambda it: [it["meta"].get("l2-category", "")]).values())))

    return {"average": mean_l2(np.arange(len(items))),
            "category": {k: mean_l2(np.array(ix)) for k, ix in _groups(items, lambda it: [it["category"]]).items()},
            "l2-category": l2}


LMMS_EVAL = {  # benchmark -> (source, judge of one item, aggregation)
    "pope": ("lmms-eval pope (lmms_eval/tasks/pope/utils.py)", _lmms_pope_judge, _lmms_pope),
    "mme": ("lmms-eval mme (lmms_eval/tasks/mme/utils.py)", _lmms_mme_judge, _lmms_mme),
    "mmstar": ("lmms-eval mmstar (lmms_eval/tasks/mmstar/utils.py)", _lmms_mmstar_judge, _lmms_mmstar),
}
RULE_SETS = ("vlmevalkit", "lmms_eval")


def rules_for(benchmark: str, bench_file, requested: str = "auto") -> str:
    """The rule set a benchmark file is scored by: ``requested`` when it is one of
    :data:`RULE_SETS`; for "auto" (or ""), lmms-eval's for an lmms-eval export (.json /
    .jsonl) of a benchmark lmms-eval rules exist for here (:data:`LMMS_EVAL`), VLMEvalKit's
    otherwise (its .tsv files). ValueError for an unknown name or lmms-eval's rules asked for a
    benchmark without them."""
    if requested in ("", "auto"):
        lmms = paths.path(bench_file).suffix in (".json", ".jsonl") and benchmark in LMMS_EVAL
        return "lmms_eval" if lmms else "vlmevalkit"
    if requested not in RULE_SETS:
        raise ValueError(f"score.rules {requested!r} is not auto or one of {RULE_SETS}")
    if requested == "lmms_eval" and benchmark not in LMMS_EVAL:
        raise ValueError(f"score.rules=lmms_eval: no lmms-eval rule here for {benchmark!r} "
                         f"(only {', '.join(LMMS_EVAL)})")
    return requested


def judge_all(benchmark: str, items: list, rules: str = "vlmevalkit") -> list:
    """[:func:`judge` of each item], or lmms-eval's per-item rule (``rules="lmms_eval"``)."""
    if rules == "lmms_eval":
        return [LMMS_EVAL[benchmark][1](it, str(it["response"])) for it in items]
    return [judge(benchmark, it) for it in items]


def official(benchmark: str, items: list, judged: list | None = None,
             rules: str = "vlmevalkit") -> dict | None:
    """The benchmark's official numbers (module docstring), None for a benchmark without one.

    Args:
      benchmark: a benchmark name (``data.benchmarks.BENCHMARKS``).
      items: records (``index``, ``kind``, ``options``, ``answer``, ``answer_type``,
        ``category``, ``group``, ``meta``) each with ``response`` (str, the raw answer); may be
        predictions of ``eval_lib.predict``, which carry these fields.
      judged: :func:`judge_all` of the items, computed when None.
      rules: "vlmevalkit" or "lmms_eval" (:func:`rules_for`; :data:`LMMS_EVAL` has POPE, MME
        and MMStar).
    Returns:
      {"rule": source, "rules": the rule set, "unit": "percent", "n": items, "unparsed":
      answers the rule could not read, ...the benchmark's numbers} (floats in percent, counts
      as ints).
    """
    if benchmark not in _AGGREGATE:
        return None
    if not items:
        raise ValueError(f"{benchmark}: no items to score")
    judged = judge_all(benchmark, items, rules) if judged is None else judged
    hits = np.array([j["hit"] for j in judged], bool)
    source, aggregate = ((LMMS_EVAL[benchmark][0], LMMS_EVAL[benchmark][2]) if rules == "lmms_eval"
                         else (RULES[benchmark], _AGGREGATE[benchmark]))
    return {"rule": source, "rules": rules, "unit": "percent", "n": len(items),
            "unparsed": sum(not j["parsed"] for j in judged), **aggregate(items, judged, hits)}


def official_lines(off: dict) -> list:
    """``official`` (:func:`official`'s dict) as printable lines: one per nested block,
    "path: name value  name value" (numbers with 2 decimals, counts as ints, None as "-"), and
    its notes."""
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return str(v)
        if isinstance(v, float):
            return f"{v:.2f}"
        return ", ".join(map(str, v)) if isinstance(v, list) else str(v)

    lines = []

    def walk(d: dict, path: str):
        leaves = [f"{k} {fmt(v)}" for k, v in d.items()
                  if not isinstance(v, dict) and k not in ("rule", "rules", "unit", "judge", "note")]
        if leaves:
            lines.append(f"{path or 'total'}: " + "  ".join(leaves))
        if d.get("note"):
            lines.append(f"{path or 'total'} note: {d['note']}")
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{path}/{k}" if path else k)

    walk(off, "")
    return lines


# -------------------------------------------------------------- prediction files ---

def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with paths.path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cell(v) -> str:
    """A table cell as VLMEvalKit's ``str(prediction)`` sees it (pandas NA strings -> "nan")."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "nan"
    v = str(v)
    return "nan" if v in PANDAS_NA else v


def _read_text(path: Path) -> str:
    """A text predictions file: UTF-8, its byte-order mark dropped (Excel's "CSV UTF-8"), or
    UTF-16 with a byte-order mark; PredictionError naming the file for anything else (e.g.
    Latin-1, which VLMEvalKit's pandas, reading UTF-8, refuses too)."""
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise PredictionError(f"{path}: not {encoding.replace('-sig', '')} text (byte {e.start}: "
                              f"{data[e.start:e.start + 1]!r}); save it as UTF-8, e.g. as Excel's "
                              "'CSV UTF-8'") from None


def _table_rows(path: Path) -> list:
    """Rows ({column lower-cased: cell}) of a .tsv / .csv / .xlsx predictions table."""
    if path.suffix == ".xlsx":
        try:
            import openpyxl
        except ImportError:
            raise PredictionError(
                f"{path}: reading .xlsx needs the openpyxl package, which is not installed "
                "(pip install openpyxl); or give the predictions as .tsv / .csv (VLMEvalKit "
                "writes TSV with PRED_FORMAT=tsv)") from None
        data = path.read_bytes()
        if not data:
            raise PredictionError(f"{path}: the file is empty (0 bytes), not an .xlsx workbook")
        try:
            sheet = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True).worksheets[0]
        except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
            raise PredictionError(f"{path}: not a readable .xlsx workbook ({type(e).__name__}: {e})") from None
        table = [list(r) for r in sheet.iter_rows(values_only=True)]
    else:
        csv.field_size_limit(sys.maxsize)
        text = _read_text(path)
        table = list(csv.reader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv" else ","))
    if not table:
        raise PredictionError(f"{path}: the file is empty")
    head = [str(h).strip().lower() for h in table[0]]
    return [dict(zip(head, r)) for r in table[1:] if any(c not in (None, "") for c in r)]


def _first_text(v):
    """The first string inside nested lists (lmms-eval's resps / filtered_resps), or None."""
    while isinstance(v, (list, tuple)) and v:
        v = v[0]
    return v if isinstance(v, str) else None


def _given(v) -> str | None:
    """A prediction file's own question / answer cell as text, None when absent or NA."""
    return None if v is None or _cell(v) == "nan" else str(v).strip()


def read_predictions(path) -> list:
    """A predictions file -> [{"index": str | None, "position": int | None, "prediction": str,
    "question": str | None, "answer": str | None}].

    * VLMEvalKit prediction tables (.xlsx, .tsv, .csv): columns ``index`` and ``prediction``
      (any case); ``question`` and ``answer``, when present, are checked against the benchmark
      row (:func:`join_predictions`); other columns are ignored.
    * .jsonl: rows with ``index`` and ``prediction`` (and optional ``question`` / ``answer``),
      or lmms-eval ``--log_samples`` rows (``doc_id``: the row's 0-based position in the
      dataset; the answer is the first text of ``filtered_resps``, else of ``resps``;
      ``doc.question`` / ``doc.answer``, when logged, are checked against the benchmark row).
    Raises PredictionError naming the file and the missing column or line.
    """
    path = paths.path(path)
    if not path.is_file():
        raise PredictionError(f"{path}: predictions file not found")
    out = []
    if path.suffix in (".tsv", ".csv", ".xlsx"):
        rows = _table_rows(path)
        for col in ("index", "prediction"):
            if rows and col not in rows[0]:
                raise PredictionError(f"{path}: missing column {col!r} (has {sorted(rows[0])})")
        for n, row in enumerate(rows, start=2):
            index = row["index"]
            if index is None or str(index).strip() == "":
                raise PredictionError(f"{path}: line {n} has an empty index")
            if isinstance(index, float) and index.is_integer():  # a spreadsheet number
                index = int(index)
            out.append({"index": str(index).strip(), "position": None,
                        "prediction": _cell(row["prediction"]),
                        **{k: _given(row.get(k)) for k in ("question", "answer")}})
    elif path.suffix == ".jsonl":
        for n, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PredictionError(f"{path}: line {n} is not JSON ({e})") from None
            if "index" in row and "prediction" in row:
                out.append({"index": str(row["index"]), "position": None,
                            "prediction": str(row["prediction"]),
                            **{k: _given(row.get(k)) for k in ("question", "answer")}})
            elif "doc_id" in row and ("filtered_resps" in row or "resps" in row):
                text = _first_text(row.get("filtered_resps"))
                text = _first_text(row.get("resps")) if text is None else text
                if text is None:
                    raise PredictionError(f"{path}: line {n} (doc_id {row['doc_id']}) has no text "
                                          "in filtered_resps / resps")
                doc = row.get("doc") if isinstance(row.get("doc"), dict) else {}
                out.append({"index": None, "position": int(row["doc_id"]), "prediction": text,
                            **{k: _given(doc.get(k)) for k in ("question", "answer")}})
            else:
                raise PredictionError(f"{path}: line {n} has neither index + prediction nor "
                                      f"lmms-eval's doc_id + filtered_resps (keys {sorted(row)})")
    else:
        raise PredictionError(f"{path}: unknown predictions file type {path.suffix!r} "
                              "(expected .xlsx, .tsv, .csv or .jsonl)")
    if not out:
        raise PredictionError(f"{path}: no predictions")
    return out


def _skip_reason(index: str, skipped: list) -> str:
    hit = [s for s in skipped if f"(index {index}):" in s]
    return f" (that row was skipped when reading the benchmark: {hit[0]})" if hit else ""


def _position(p: dict, records: list, pred_file, bench_file, skipped: list) -> int:
    """The benchmark row of an lmms-eval prediction (its doc_id), its question checked."""
    if skipped:
        raise PredictionError(f"{pred_file}: lmms-eval rows are joined by position, which needs "
                              f"every row of {bench_file}, but {len(skipped)} were skipped "
                              f"({skipped[0]})")
    pos = p["position"]
    if not 0 <= pos < len(records):
        raise PredictionError(f"{pred_file}: doc_id {pos} is not a row of {bench_file} "
                              f"({len(records)} rows)")
    _check_same_row(p, records[pos], f"{pred_file}: doc_id {pos}", f"row {pos} of {bench_file}")
    return pos


def _same_answer(given: str, rec: dict) -> bool:
    """Whether a prediction file's answer cell names the record's gold answer: the same text
    (any case, a letter also as "(A)"; numbers compared as numbers) or, for multiple choice,
    the gold option's text."""
    given = given.strip("()").strip() if len(given) == 3 else given
    gold = [rec["answer"]]
    if rec["kind"] == "mc" and rec["answer"] in LETTERS[:len(rec["options"])]:
        gold.append(rec["options"][LETTERS.index(rec["answer"])])
    for g in gold:
        if given.lower() == g.lower():
            return True
        try:
            if float(given) == float(g):
                return True
        except ValueError:
            pass
    return False


def _check_same_row(p: dict, rec: dict, pred_where: str, bench_where: str):
    """PredictionError when a prediction's own question / answer (if given) is not the benchmark
    row's: the predictions were made on another benchmark file."""
    if p["question"] is not None and not rec["question"].endswith(p["question"]):
        raise PredictionError(f"{pred_where} asks {p['question']!r} but {bench_where} (index "
                              f"{rec['index']}) asks {rec['question']!r}: the predictions are for "
                              "another benchmark file")
    if p["answer"] is not None and not _same_answer(p["answer"], rec):
        raise PredictionError(f"{pred_where} has answer {p['answer']!r} but {bench_where} (index "
                              f"{rec['index']}) has {rec['answer']!r}: the predictions are for "
                              "another benchmark file")


def join_predictions(records: list, preds: list, pred_file, bench_file, skipped: list = (),
                     allow_subset: bool = False) -> tuple:
    """Benchmark records joined with :func:`read_predictions`' rows: by ``index``, lmms-eval
    rows by position (``doc_id``).

    Returns (items: the matched records, without ``image``, each with ``response``, in the
    benchmark's order; counts {"benchmark_rows", "predictions", "matched",
    "benchmark_rows_without_prediction"}). Raises PredictionError naming the file and index for
    a prediction whose own question or answer is not its benchmark row's (another benchmark's
    predictions), a duplicate index (on either side, when joining by index), a prediction whose index is not
    in the benchmark, or (unless ``allow_subset``) a benchmark row without a prediction.
    """
    by_index = {}
    if any(p["index"] is not None for p in preds):
        for pos, r in enumerate(records):
            if r["index"] in by_index:
                raise PredictionError(f"{bench_file}: index {r['index']!r} occurs twice; joining "
                                      "predictions by index needs unique indices")
            by_index[r["index"]] = pos
    answers, extra = {}, []  # answers: benchmark row -> prediction
    for p in preds:
        if p["index"] is None:
            pos = _position(p, records, pred_file, bench_file, skipped)
        elif p["index"] in by_index:
            pos = by_index[p["index"]]
            _check_same_row(p, records[pos], f"{pred_file}: index {p['index']!r}", str(bench_file))
        else:
            extra.append(p["index"])
            continue
        if pos in answers:
            raise PredictionError(f"{pred_file}: index {records[pos]['index']!r} has two predictions")
        answers[pos] = p["prediction"]
    if extra:
        raise PredictionError(f"{pred_file}: {len(extra)} prediction(s) have an index that is not "
                              f"in {bench_file}, e.g. index {extra[0]!r}{_skip_reason(extra[0], skipped)}")
    missing = [r["index"] for pos, r in enumerate(records) if pos not in answers]
    if missing and not allow_subset:
        raise PredictionError(f"{pred_file}: no prediction for {len(missing)} of the {len(records)} "
                              f"rows of {bench_file}, e.g. index {missing[0]!r} (allow_subset "
                              "scores only the rows that have one)")
    items = [{**{k: v for k, v in records[pos].items() if k != "image"}, "response": answers[pos]}
             for pos in sorted(answers)]
    return items, {"benchmark_rows": len(records), "predictions": len(preds), "matched": len(items),
                   "benchmark_rows_without_prediction": len(missing)}
