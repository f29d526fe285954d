"""Official benchmark numbers as the benchmark owners compute them (VLMEvalKit's judge-free rules;
Cambrian-1's CV-Bench overall) against hand-computed values, and evaluate.py's score-only mode
on hand-made benchmark and prediction files (no model)."""

import codecs
import csv
import importlib.util
import json
from pathlib import Path

import pytest

from vitsink_jax import eval_lib, scores as S
from vitsink_jax.data import benchmarks as B
from vitsink_jax.modes.benchmark import run_benchmark
from vitsink_jax.modes.common import benchmark_records, benchmark_rules
from vitsink_jax.modes.score import run_score

ROOT = Path(__file__).resolve().parents[1]

MC4 = ["a cat", "a dog", "a car", "a tree"]


def item(index, kind, answer, response, category="", group="", options=(), meta=None,
         answer_type="text"):
    """A scored item: a benchmark record (no image) plus the model's raw response."""
    return {"index": str(index), "kind": kind, "answer": answer, "response": response,
            "category": category, "group": group, "options": list(options), "meta": meta or {},
            "answer_type": answer_type}


def flat(d, path=""):
    """A nested dict as {"a/b": leaf}."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{path}{k}/") if isinstance(v, dict) else {f"{path}{k}": v})
    return out


def assert_close(actual: dict, expected: dict):
    """Every leaf of ``expected`` (nested dicts) equals ``actual``'s within 1e-6."""
    got = flat(actual)
    assert {k: got.get(k) for k in flat(expected)} == pytest.approx(flat(expected), abs=1e-6)


# ------------------------------------------------------------------------ extraction ---

def test_mcq_extraction_is_vlmevalkits_can_infer():
    abcd = dict(zip("ABCD", MC4))
    assert S.can_infer("B", abcd) == "B"
    assert S.can_infer("The answer is (B).", abcd) == "B"
    assert S.can_infer("A ... so the answer is B.", abcd) == "B"    # two letters: the regex decides
    assert S.can_infer("the answer is b", abcd) == "B"              # the regex ignores case
    assert S.can_infer("b", abcd) == ""                             # a bare lower-case letter misses
    assert S.can_infer("B is the one I would pick given this photo", abcd) == ""  # letter too early
    assert S.can_infer("Cannot determine the answer", abcd) == "Z"  # a refusal
    assert S.can_infer("it is a dog", abcd) == "B"                  # the one option text it holds
    assert S.can_infer("it is a dog " * 5, abcd) == ""              # longer than 2 x all options
    assert S.can_infer("a cat or a dog", abcd) == ""                # two option texts
    two = {"A": "left", "B": "right"}
    assert S.can_infer("C", two) == ""                              # not an option of this row
    rec = item(0, "mc", "A", "C", options=["left", "right"])
    assert S.judge("cvbench", rec) == {"extracted": "Z", "hit": False, "parsed": False}


def test_yes_no_extraction_is_vlmevalkits():
    assert S.yes_or_no("Yes, there is a cat.") == "Yes"
    assert S.yes_or_no("No.") == "No" and S.yes_or_no("Yes!") == "Yes"
    assert S.yes_or_no("yes or no") == "Unknown" and S.yes_or_no("Maybe") == "Unknown"
    assert S.yes_or_no("I can't say yes-or-no") == "Unknown"   # '-' inside a word: a space
    assert S.yes_or_no("There is no dog; yes") == "Unknown"
    assert S.process_punctuation("3.5 a.b (x)") == "3.5 ab x "    # " (": removed; ")": a space
    assert S.process_punctuation("pi is 3.14, roughly.") == "pi is 3.14 roughly"


# ------------------------------------------------------------------- official numbers ---

def pope_items():
    # exploded rows: i1 adversarial, i1 popular, i2 adversarial, i3 popular, i4 random
    return [item(1, "yesno", "yes", "Yes", "adversarial,popular"),
            item(2, "yesno", "no", "Yes, there is", "adversarial"),      # false positive
            item(3, "yesno", "yes", "No", "popular"),                    # false negative
            item(4, "yesno", "no", "I am not sure", "random")]           # Unknown: a "no", wrong


POPE_OVERALL = {"f1": 200 / 3, "acc": 40.0, "precision": 200 / 3, "recall": 200 / 3,
                "yes_ratio": 60.0, "n": 5}
POPE_SPLITS = {"adversarial": {"f1": 200 / 3, "acc": 50.0, "precision": 50.0, "recall": 100.0,
                               "yes_ratio": 100.0, "n": 2},
               "popular": {"f1": 200 / 3, "acc": 50.0, "precision": 100.0, "recall": 50.0,
                           "yes_ratio": 50.0, "n": 2},
               "random": {"f1": 0.0, "acc": 0.0, "precision": 0.0, "recall": 0.0,
                          "yes_ratio": 0.0, "n": 1}}


def test_pope_counts_a_multi_split_row_once_per_split():
    off = S.official("pope", pope_items())
    assert off["n"] == 4 and off["unparsed"] == 1
    assert_close(off["Overall"], POPE_OVERALL)       # 5 exploded rows, not 4
    assert_close(off["splits"], POPE_SPLITS)
    assert set(off["splits"]) == set(POPE_SPLITS)    # no "adversarial,popular" category
    # eval_lib.summarize puts the same numbers under "official"
    preds = [{**p, "correct": False, "tag": "", "prediction": ""} for p in pope_items()]
    res = eval_lib.summarize("pope", preds)
    assert_close(res["official"]["splits"], POPE_SPLITS)
    assert "pope" not in res
    assert "official" not in eval_lib.summarize("embedded", preds)


def mme_items(drop=()):
    right = {"yes": "Yes", "no": "No"}
    out = []
    for total, cats in S.MME_CATEGORIES.items():
        for cat in cats:
            if cat in drop:
                continue
            for q, ans in enumerate(("yes", "no")):
                out.append(item(f"{cat}{q}", "yesno", ans, right[ans], cat, f"{cat}/1.jpg"))
    # existence: a second image, rows interleaved: image 1 q1 right, q2 wrong; image 2 both right
    out += [item("e2a", "yesno", "yes", "Yes", "existence", "existence/2.jpg"),
            item("e2b", "yesno", "no", "no.", "existence", "existence/2.jpg")]
    for it in out:
        if it["index"] == "existence1":
            it["response"] = "Yes"
        if it["index"] == "code_reasoning1":
            it["response"] = "Hard to say"   # Unknown: wrong
    return out


def test_mme_totals_over_vlmevalkit_lists_and_acc_plus_by_image():
    off = S.official("mme", mme_items())
    ex = off["categories"]["existence"]
    assert_close(ex, {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "n": 4, "images": 2})
    assert off["categories"]["code_reasoning"]["score"] == 50.0      # acc 50 + acc+ 0
    assert off["perception"] == 9 * 200 + 125.0
    assert off["reasoning"] == 3 * 200 + 50.0
    assert off["unparsed"] == 1
    partial = S.official("mme", mme_items(drop=("scene",)))
    assert partial["perception"] is None and partial["perception_missing_categories"] == ["scene"]
    assert partial["reasoning"] == 650.0


def cvbench_items():
    rows = []
    # 2D ADE20K: 1 of 2 right; 2D COCO: 4 of 4; 3D Omni3D: 1 of 4
    for i, (src, split, task, ok) in enumerate(
            [("ADE20K", "2D", "Count", True), ("ADE20K", "2D", "Count", False)]
            + [("COCO", "2D", "Count", True)] * 4
            + [("Omni3D", "3D", "Depth", True)] + [("Omni3D", "3D", "Depth", False)] * 3):
        opts = MC4 if task == "Count" else ["the lamp", "the bed"]
        rows.append(item(i, "mc", "B", "(B)" if ok else "A", task, options=opts,
                         meta={"source": src, "split": split}))
    return rows


CVBENCH = {"pooled": 60.0, "sources": {"ADE20K": 50.0, "COCO": 100.0, "Omni3D": 25.0},
           "tasks": {"Count": 500 / 6, "Depth": 25.0}, "2D": 75.0, "3D": 25.0, "Overall": 50.0}


def test_cvbench_overall_is_cambrians_mean_of_2d_and_3d():
    off = S.official("cvbench", cvbench_items())
    assert_close(off, CVBENCH)   # 2D: the mean over sources (75), not 5 of 6 rows


def test_mmstar_overall_and_categories():
    items = [item(0, "mc", "B", "The answer is (B).", "c1", options=MC4, meta={"l2-category": "l2a"}),
             item(1, "mc", "A", "B", "c1", options=MC4, meta={"l2-category": "l2a"}),
             item(2, "mc", "C", "Answer: C", "c1", options=MC4, meta={"l2-category": "l2b"}),
             item(3, "mc", "D", "no idea", "c2", options=MC4, meta={"l2-category": "l2a"})]
    off = S.official("mmstar", items)
    assert off["Overall"] == 50.0 and off["unparsed"] == 1
    assert_close(off, {"category": {"c1": 200 / 3, "c2": 0.0},
                       "l2-category": {"l2a": 100 / 3, "l2b": 100.0}})
    assert "splits" not in off


def mathvista_items():
    fqa, tqa = "figure question answering", "textbook question answering"
    frac = ["3/11", "8/11", "6/11", "3/5"]
    return [
        item(1, "mc", "B", "The correct answer is (B) 8/11.", options=frac,
             meta={"task": fqa, "skills": ["arithmetic reasoning"]}),               # hit
        item(2, "mc", "A", "I think it is 6/11", options=frac,
             meta={"task": tqa, "skills": ["arithmetic reasoning", "algebraic reasoning"]}),  # C
        item(3, "open", "6", "6", answer_type="integer",
             meta={"task": fqa, "skills": ["statistical reasoning"]}),              # hit
        item(4, "open", "6", "The answer is 6", answer_type="integer",
             meta={"task": tqa, "skills": ["arithmetic reasoning"]}),               # judge only
        item(5, "open", "0", "0", answer_type="integer",
             meta={"task": fqa, "skills": ["statistical reasoning"]}),              # 0 is falsy
        item(6, "open", "1.5", "1.50", answer_type="float",
             meta={"task": tqa, "skills": ["algebraic reasoning"]}),                # hit
        item(7, "open", "red", "red", meta={"task": fqa, "skills": ["logical reasoning"]}),  # text
    ]


def block(tot, prefetch, hit):
    return {"tot": tot, "prefetch": prefetch, "hit": hit, "prefetch_rate": 100 * prefetch / tot,
            "acc": 100 * hit / tot}


MATHVISTA = {"Overall": block(7, 4, 3),
             "task": {"figure question answering": block(4, 2, 2),
                      "textbook question answering": block(3, 2, 1)},
             "skill": {"algebraic reasoning": block(2, 2, 1), "arithmetic reasoning": block(3, 2, 1),
                       "logical reasoning": block(1, 0, 0), "statistical reasoning": block(2, 1, 1)}}


def test_mathvista_prefetch_rules():
    off = S.official("mathvista", mathvista_items())
    assert_close(off, MATHVISTA)
    assert off["unparsed"] == 3


def test_official_lines_print_every_block():
    lines = S.official_lines(S.official("pope", pope_items()))
    assert lines[0] == "total: n 4  unparsed 1"
    assert lines[1].startswith("Overall: f1 66.67  acc 40.00")
    assert any(line.startswith("splits/adversarial: f1 66.67") for line in lines)


# ---------------------------------------------------------------- score-only mode ---

def default_config(**kw):
    spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.mode = "score"
    for k, v in kw.items():
        section, leaf = k.split(".")
        cfg[section][leaf] = v
    return cfg


def write_table(path, rows, delimiter="\t", quoting=csv.QUOTE_MINIMAL):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter, quoting=quoting)
        w.writeheader()
        w.writerows(rows)
    return path


def score(tmp_path, name, bench_rows, pred_path, **kw):
    bench = write_table(tmp_path / f"{name}.tsv", bench_rows)
    cfg = default_config(**{"benchmark.name": name, "benchmark.file": str(bench),
                            "score.predictions": str(pred_path), **kw})
    return run_score(cfg, tmp_path / "work")


def test_score_mode_pope_tsv_predictions(tmp_path):
    bench = [dict(index=it["index"], question=f"Is there a thing {it['index']}?",
                  answer=it["answer"].capitalize(), category=it["category"], image="x")
             for it in pope_items()]
    preds = write_table(tmp_path / "model_POPE.tsv",    # VLMEvalKit's PRED_FORMAT=tsv: QUOTE_ALL
                        [dict(index=it["index"], question=f"Is there a thing {it['index']}?",
                              prediction=it["response"])
                         for it in pope_items()], quoting=csv.QUOTE_ALL)
    report = score(tmp_path, "pope", bench, preds)
    saved = json.loads((tmp_path / "work" / "results.json").read_text())
    assert_close(saved["official"], {"Overall": POPE_OVERALL, "splits": POPE_SPLITS})
    assert saved["predictions_sha256"] == S.file_sha256(preds) and len(saved["file_sha256"]) == 64
    assert saved["unparsed"] == 1 and saved["counts"]["matched"] == 4
    assert saved["config"]["mode"] == "score" and "versions" in saved
    assert report["table"].startswith("official pope")
    per_item = [json.loads(x) for x in (tmp_path / "work" / "scored_predictions.jsonl").read_text().splitlines()]
    assert [p["extracted"] for p in per_item] == ["Yes", "Yes", "No", "Unknown"]


def test_score_mode_cvbench_csv_predictions(tmp_path):
    bench, preds = [], []
    for it in cvbench_items():
        opts = dict(zip("ABCD", it["options"] + ["", ""]))
        bench.append(dict(index=it["index"], question="Which?", **opts, answer="B",
                          category=it["category"], source=it["meta"]["source"],
                          split=it["meta"]["split"], image="x"))
        preds.append(dict(index=it["index"], prediction=it["response"]))
    report = score(tmp_path, "cvbench", bench, write_table(tmp_path / "p.csv", preds, ","))
    assert_close(report["official"], CVBENCH)


def test_score_mode_mathvista_jsonl_and_lmms_eval_samples(tmp_path):
    bench, preds = [], []
    for it in mathvista_items():
        mc = it["kind"] == "mc"
        bench.append(dict(index=it["index"], question=f"Question {it['index']}?",
                          answer=it["options"][ord(it["answer"]) - 65] if mc else it["answer"],
                          question_type="multi_choice" if mc else "free_form",
                          answer_type=it["answer_type"], choices=str(it["options"]) if mc else "",
                          answer_option=it["answer"] if mc else "", task=it["meta"]["task"],
                          skills=str(it["meta"]["skills"]), image="x"))
        preds.append({"index": int(it["index"]), "prediction": it["response"]})
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p) for p in preds))
    report = score(tmp_path, "mathvista", bench, tmp_path / "p.jsonl")
    assert_close(report["official"], MATHVISTA)
    # lmms-eval --log_samples rows: joined by doc_id (the row's position), doc.question checked
    lmms = [{"doc_id": i, "doc": {"question": b["question"]}, "resps": [["?"]],
             "filtered_resps": [p["prediction"]]} for i, (b, p) in enumerate(zip(bench, preds))]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in lmms))
    report = score(tmp_path, "mathvista", bench, tmp_path / "s.jsonl")
    assert_close(report["official"], MATHVISTA)
    lmms[0]["doc"]["question"] = "Another question?"
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in lmms))
    with pytest.raises(SystemExit, match=r"s.jsonl: doc_id 0 asks 'Another question\?'"):
        score(tmp_path, "mathvista", bench, tmp_path / "s.jsonl")


def test_score_mode_errors_name_file_column_and_index(tmp_path):
    bench = [dict(index=i, question="q?", answer="Yes", category="random", image="x") for i in range(3)]

    def fails(rows, match, name="p.tsv", **kw):
        path = tmp_path / name
        if rows is not None:
            write_table(path, rows)
        with pytest.raises(SystemExit, match=match):
            score(tmp_path, "pope", bench, path, **kw)

    fails([dict(index=0, prediction="yes"), dict(index=1, prediction="yes")],
          r"p.tsv: no prediction for 1 of the 3 rows of .*pope.tsv, e.g. index '2'")
    fails([dict(index=i, prediction="yes") for i in range(4)],
          r"p.tsv: 1 prediction\(s\) have an index that is not in .*pope.tsv, e.g. index '3'")
    fails([dict(index=i % 2, prediction="yes") for i in range(3)], r"p.tsv: index '0' has two predictions")
    fails([dict(idx=0, prediction="yes")], r"p.tsv: missing column 'index'")
    if importlib.util.find_spec("openpyxl") is None:
        (tmp_path / "p.xlsx").write_bytes(b"PK")
        fails(None, r"p.xlsx: reading .xlsx needs the openpyxl package", name="p.xlsx")
    else:  # VLMEvalKit's default prediction file: an .xlsx sheet, read as the .tsv is
        import openpyxl

        book = openpyxl.Workbook()
        book.active.append(["index", "prediction"])
        for i, p in enumerate(["Yes", "no", "Yes, it is."]):
            book.active.append([i, p])
        book.save(tmp_path / "p.xlsx")
        assert score(tmp_path, "pope", bench, tmp_path / "p.xlsx")["official"]["Overall"]["acc"] == pytest.approx(200 / 3)
    # a subset is scored when allowed, and counted
    write_table(tmp_path / "p.tsv", [dict(index=0, prediction="yes"), dict(index=1, prediction="no")])
    report = score(tmp_path, "pope", bench, tmp_path / "p.tsv", **{"score.allow_subset": True})
    assert report["counts"]["benchmark_rows_without_prediction"] == 1
    assert report["official"]["Overall"]["acc"] == 50.0


def test_benchmark_meta_fields_survive_tfds(tmp_path):
    rows = [dict(index=0, question="q?", A="x", B="y", answer="A", category="c",
                 **{"l2-category": "l2"}, skills="['a', 'b']", task="t", image="x")]
    recs, _ = B.read_benchmark(write_table(tmp_path / "m.tsv", rows), "mmstar", decode_images=False)
    assert recs[0]["meta"] == {"l2-category": "l2", "skills": ["a", "b"], "task": "t"}
    B.build_tfds(recs, "meta", tmp_path)
    assert B.load_tfds("meta", tmp_path)[0]["meta"] == recs[0]["meta"]


# ------------------------------------------- issue 34: VLMEvalKit's files as it reads them ---

def test_cvbench_option_columns_typed_as_pandas_types_them(tmp_path):
    # C / D are empty on the 2-option row, so pandas reads them as floats: "5" -> "5.0"; A / B
    # hold text ("left"), so "2" and "3" stay. Row 2: "5.0" is not in "5" (a miss in
    # VLMEvalKit, a hit on the cell text); rows 3-4: 14 characters fit 2 x (1+1+3+3) = 16 but not
    # 2 x 4 = 8. VLMEvalKit: hit, miss, hit, hit = 75.00 (was 50.00 here).
    count = dict(A="2", B="3", C="5", D="7", category="Count")
    bench = [dict(index=1, question="Where?", A="left", B="right", C="", D="", answer="A",
                  category="Relation"),
             dict(index=2, question="How many?", **count | {"answer": "C"}),
             dict(index=3, question="How many?", **count | {"answer": "A"}),
             dict(index=4, question="How many?", **count | {"answer": "B"})]
    bench = [{**r, "source": "COCO", "split": "2D", "image": "x"} for r in bench]
    preds = write_table(tmp_path / "p.tsv", [dict(index=i, prediction=p) for i, p in
                                             [(1, "left"), (2, "5"), (3, "I count 2 cows"),
                                              (4, "I count 3 cows")]])
    off = score(tmp_path, "cvbench", bench, preds)["official"]
    assert off["2D"] == pytest.approx(75.0)
    recs, _ = B.read_benchmark(tmp_path / "cvbench.tsv", "cvbench", decode_images=False)
    assert recs[1]["options"] == ["2", "3", "5", "7"]          # our prompt keeps the cell text
    assert recs[1]["meta"]["vlmevalkit_choices"] == {"A": "2", "B": "3", "C": "5.0", "D": "7.0"}
    assert B.pandas_column(["1", "2"]) == ["1", "2"] and B.pandas_column(["2.50", "x"]) == ["2.50", "x"]
    assert B.pandas_column(["2.50", "NA"]) == ["2.5", None]


def test_mmstar_option_cells_pandas_reads_as_missing_are_no_choice(tmp_path):
    # option A "None" is NaN to pandas: VLMEvalKit's choices are B-D, so row 1 reads no letter
    # (miss) where the cell text matched option A: 50.00 (was 100.00)
    bench = [dict(index=1, question="Which?", A="None", B="red", C="blue", D="green", answer="A"),
             dict(index=2, question="Which?", A="cat", B="dog", C="N/A", D="cow", answer="B")]
    bench = [{**r, "category": "math", "l2-category": "geometry", "image": "x"} for r in bench]
    preds = write_table(tmp_path / "p.tsv", [dict(index=1, prediction="It is None of them"),
                                             dict(index=2, prediction="B")])
    assert score(tmp_path, "mmstar", bench, preds)["official"]["Overall"] == pytest.approx(50.0)


def test_mme_acc_plus_multiplies_an_images_first_two_questions():
    # existence/3.jpg has three questions, right, right, wrong: VLMEvalKit's val[0] * val[1]
    # counts the image, so acc+ = 2 of 3 images = 66.67 (was 1 of 3 = 33.33 when all had to be right)
    items = mme_items() + [item("e3a", "yesno", "yes", "Yes", "existence", "existence/3.jpg"),
                           item("e3b", "yesno", "no", "No", "existence", "existence/3.jpg"),
                           item("e3c", "yesno", "no", "Yes", "existence", "existence/3.jpg")]
    ex = S.official("mme", items)["categories"]["existence"]
    assert_close(ex, {"acc": 500 / 7, "acc_plus": 200 / 3, "images": 3})
    one = S.official("mme", mme_items() + [item("e4", "yesno", "no", "No", "existence", "existence/4.jpg")])
    assert one["categories"]["existence"]["acc_plus"] is None and "one question" in one["note"]


def test_mathvista_gold_is_answer_option(tmp_path):
    # row 5's choices repeat "1": its answer_option C is the gold (VLMEvalKit's post_check),
    # not A, the first option with the answer text. Hits: rows 1, 3 and 5 = 60.00 (was 40.00).
    rows = [(["1", "2"], "1", "A", "A"), (["1", "2"], "2", "B", "A"), (["3", "4"], "4", "B", "B"),
            (["5", "6"], "5", "A", "B"), (["1", "2", "1"], "1", "C", "C")]
    bench = [dict(index=i, question=f"Q{i}?", answer=ans, question_type="multi_choice",
                  answer_type="text", choices=str(ch), answer_option=opt, task="t", skills="['s']",
                  image="x") for i, (ch, ans, opt, _) in enumerate(rows, start=1)]
    preds = write_table(tmp_path / "p.tsv", [dict(index=i, prediction=r[3]) for i, r in enumerate(rows, start=1)])
    assert score(tmp_path, "mathvista", bench, preds)["official"]["Overall"]["acc"] == pytest.approx(60.0)


def test_predictions_of_another_benchmark_are_refused(tmp_path):
    # a VLMEvalKit MME prediction table (indices 0-2) given for a POPE file with indices 0-2:
    # was scored (exit 0), now refused at the first index whose question differs
    bench = [dict(index=i, question=f"Is there a dog {i}?", answer="Yes", category="random", image="x")
             for i in range(3)]
    other = [dict(index=i, question=f"Is there a dog {i}?" if i == 0 else "Is this a poster?",
                  answer="Yes", prediction="Yes") for i in range(3)]
    with pytest.raises(SystemExit, match=r"p.tsv: index '1' asks 'Is this a poster\?' but .*pope.tsv "
                                         r"\(index 1\) asks 'Is there a dog 1\?'"):
        score(tmp_path, "pope", bench, write_table(tmp_path / "p.tsv", other))
    same_q = [{**r, "question": f"Is there a dog {r['index']}?", "answer": "No" if r["index"] == 2 else "Yes"}
              for r in other]
    with pytest.raises(SystemExit, match=r"p.tsv: index '2' has answer 'No' but .* has 'yes'"):
        score(tmp_path, "pope", bench, write_table(tmp_path / "p.tsv", same_q))
    same_q[2]["answer"] = "Yes"
    assert score(tmp_path, "pope", bench, write_table(tmp_path / "p.tsv", same_q))["official"]["Overall"]["acc"] == 100.0
    mc = {"answer": "B", "kind": "mc", "options": ["5", "7"]}   # a letter, "(B)", the text, 7.0
    assert all(S._same_answer(a, mc) for a in ("B", "(B)", "7", "7.0"))
    assert not any(S._same_answer(a, mc) for a in ("A", "5", "(C)"))


def test_prediction_file_encodings(tmp_path):
    # Excel's "CSV UTF-8" (BOM; was refused as "missing column 'index'") and UTF-16 are read,
    # Latin-1 is refused naming the file, as is a 0-byte .xlsx (was a BadZipFile traceback)
    bench = [dict(index=i, question="Is it a café?", answer="Yes", category="random", image="x")
             for i in range(2)]
    text = "index,question,prediction\n0,Is it a café?,Yes\n1,Is it a café?,No\n"
    for name, data in [("bom.csv", codecs.BOM_UTF8 + text.encode()), ("u16.csv", text.encode("utf-16"))]:
        (tmp_path / name).write_bytes(data)
        assert score(tmp_path, "pope", bench, tmp_path / name)["official"]["Overall"]["acc"] == 50.0
    (tmp_path / "l1.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(SystemExit, match=r"l1.csv: not utf-8 text \(byte 39: b'\\xe9'\)"):
        score(tmp_path, "pope", bench, tmp_path / "l1.csv")
    (tmp_path / "p.xlsx").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"p.xlsx: the file is empty \(0 bytes\)|p.xlsx: reading .xlsx needs"):
        score(tmp_path, "pope", bench, tmp_path / "p.xlsx")


# ------------------------------------------------------------ issue 34: lmms-eval's rules ---

def lmms_files(tmp_path, rows, responses):
    """An lmms-eval benchmark export (.jsonl) and its --log_samples predictions (doc_id)."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({**r, "image": "x"}) for r in rows))
    preds = tmp_path / "samples.jsonl"
    preds.write_text("\n".join(json.dumps({"doc_id": i, "doc": {"question": r["question"]},
                                           "filtered_resps": [p]})
                               for i, (r, p) in enumerate(zip(rows, responses))))
    return bench, preds


def score_lmms(tmp_path, name, rows, responses, **kw):
    bench, preds = lmms_files(tmp_path, rows, responses)
    cfg = default_config(**{"benchmark.name": name, "benchmark.file": str(bench),
                            "score.predictions": str(preds), **kw})
    run_score(cfg, tmp_path / "work")
    return json.loads((tmp_path / "work" / "results.json").read_text())


def test_lmms_eval_pope_counts_only_a_whole_yes_or_no(tmp_path):
    # "Yes, there is a dog." is wrong for lmms-eval (not exactly "yes") but not a false negative:
    # acc 2/4 = 50.00 (VLMEvalKit's rules, used before: 75.00), precision 1/2, recall 1/1,
    # F1 66.67, yes_ratio (lmms-eval's: the gold answers') 50.00
    rows = [dict(question_id=i, question=f"Is there a dog {i}?", answer=a, category="random")
            for i, a in enumerate(["yes", "yes", "no", "no"])]
    saved = score_lmms(tmp_path, "pope", rows, ["Yes", "Yes, there is a dog.", "No", "yes"])
    assert saved["rules"] == "lmms_eval" and saved["official"]["rules"] == "lmms_eval"
    assert_close(saved["official"]["Overall"], {"acc": 50.0, "precision": 50.0, "recall": 100.0,
                                                "f1": 200 / 3, "yes_ratio": 50.0})
    forced = score_lmms(tmp_path, "pope", rows, ["Yes", "Yes, there is a dog.", "No", "yes"],
                        **{"score.rules": "vlmevalkit"})
    assert forced["rules"] == "vlmevalkit" and forced["official"]["Overall"]["acc"] == 75.0


def test_lmms_eval_mme_reads_four_characters_and_pairs_by_question_id(tmp_path):
    # existence: e1 both right (200), e2 "There is no dog" is "other" (lmms-eval reads the first
    # four characters): acc 50 + acc+ 0 = 50 -> (200 + 50) / 2 = 125; code_reasoning: 200.
    # Totals over the categories present: perception 125, reasoning 200 (were None: every row
    # of a category in one image, and VLMEvalKit's totals need all 14 categories)
    rows = [dict(question_id=q, question=f"{q} {n}? Please answer yes or no.", answer=a, category=c)
            for q, c in [("existence/1.png", "existence"), ("existence/2.png", "existence"),
                         ("code_reasoning/1.png", "code_reasoning")]
            for n, a in enumerate(["Yes", "No"])]
    responses = ["Yes, there is", "No", "yes", "There is no dog", "Yes", "no."]
    off = score_lmms(tmp_path, "mme", rows, responses)["official"]
    assert_close(off, {"perception": 125.0, "reasoning": 200.0,
                       "categories": {"existence": {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "images": 2}}})
    forced = score_lmms(tmp_path, "mme", rows, responses, **{"score.rules": "vlmevalkit"})["official"]
    assert forced["categories"]["existence"]["score"] == 200.0 and forced["perception"] is None


def test_lmms_eval_mmstar_export_is_read_and_scored_by_exact_match(tmp_path):
    # options inside the question, l2_category: was refused (no options). lmms-eval: "I think D"
    # misses (its first character is "i"); per-l2 means 100, 100, 0 -> average 66.67,
    # math 100, science & technology 0 (VLMEvalKit's can_infer reads all four: 100)
    q = "What is it?\nOptions: A: cat, B: dog, C: cow, D: pig"
    rows = [dict(index=i, question=q, answer=a, category=c, l2_category=l2) for i, (a, c, l2) in enumerate(
        [("B", "math", "geometry"), ("A", "math", "geometry"), ("C", "math", "statistical reasoning"),
         ("D", "science & technology", "biology & chemistry & physics")])]
    responses = ["B", "(A) cat", "The answer is C", "I think D"]
    off = score_lmms(tmp_path, "mmstar", rows, responses)["official"]
    assert_close(off, {"average": 200 / 3, "category": {"math": 100.0, "science & technology": 0.0}})
    recs, _ = B.read_benchmark(tmp_path / "bench.jsonl", "mmstar", decode_images=False)
    assert recs[0]["options"] == ["cat", "dog", "cow", "pig"] and recs[0]["meta"]["l2-category"] == "geometry"
    forced = score_lmms(tmp_path, "mmstar", rows, responses, **{"score.rules": "vlmevalkit"})
    assert forced["official"]["Overall"] == 100.0
    with pytest.raises(SystemExit, match="score.rules=lmms_eval: no lmms-eval rule here for 'cvbench'"):
        score_lmms(tmp_path, "cvbench", rows, responses, **{"score.rules": "lmms_eval"})


def test_unmatched_labels_reach_results_json_block(tmp_path, capsys):
    # benchmark_records' second value is spread into every benchmark-mode results.json
    from vitsink_jax.data.synthetic import embedded_benchmark

    index = [r["index"] for r in embedded_benchmark(0, 2, 56)[:3]]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"index,tag\n{index[0]},global\n{index[1]},local\nnot-a-row,mixed\n")
    cfg = default_config(**{"benchmark.name": "embedded", "benchmark.limit": 3,
                            "benchmark.image_size": 56, "benchmark.labels": str(labels)})
    _, source, _ = benchmark_records(cfg, tmp_path / "work")
    info = source["labels"]
    assert info["labels_not_in_benchmark"] == 1 and info["labels_not_in_benchmark_first"] == ["not-a-row"]
    assert "1 label(s) match no benchmark index, e.g. not-a-row" in capsys.readouterr().out
    assert source["skipped_rows"] == []


# ------------------------------------- issue 34 point 5: benchmark mode picks rules as score ---

def png_b64(seed: int) -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 16, 3), np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def run_benchmark_mode(tmp_path, checkpoint, name, rows, responses=None, work="work", **kw):
    """evaluate.py --config.mode=benchmark (variant none) on an lmms-eval export (.jsonl) of
    ``rows``, each with a small PNG of its own (seeded by its question_id), by the model in
    ``checkpoint``; ``responses`` (one
    per row) replace the model's raw answers, so the rule set, not the random model, is what
    the numbers show. Returns results.json."""
    from unittest import mock

    bench = tmp_path / f"{name}.jsonl"
    bench.write_text("\n".join(json.dumps({**r, "image": png_b64(r["question_id"])}) for r in rows))
    cfg = default_config(**{"benchmark.name": name, "benchmark.file": str(bench), **kw})
    cfg.mode, cfg.variants, cfg.checkpoint = "benchmark", ("none",), str(checkpoint)
    real = eval_lib.predict
    answer = {str(r["question_id"]): resp for r, resp in zip(rows, responses or [])}

    def predict(*args, **kwargs):
        preds = real(*args, **kwargs)
        return [dict(p, response=answer[p["index"]]) for p in preds] if responses else preds

    with mock.patch.object(eval_lib, "predict", predict):
        run_benchmark(cfg, tmp_path / work)
    return json.loads((tmp_path / work / "results.json").read_text())


def test_benchmark_mode_scores_an_lmms_eval_file_by_lmms_evals_rules(tmp_path, benchmark_checkpoint):
    """The numbers of test_lmms_eval_pope_counts_only_a_whole_yes_or_no, now from a benchmark
    run: lmms-eval's rules for its own export (benchmark mode used VLMEvalKit's: acc 75.00),
    score.rules overrides, results.json records the rule set."""
    rows = [dict(question_id=i, question=f"Is there a dog {i}?", answer=a, category="random")
            for i, a in enumerate(["yes", "yes", "no", "no"])]
    responses = ["Yes", "Yes, there is a dog.", "No", "yes"]
    saved = run_benchmark_mode(tmp_path, benchmark_checkpoint, "pope", rows, responses)
    official = saved["results"]["none"]["official"]
    assert saved["rules"] == "lmms_eval" and official["rules"] == "lmms_eval"
    assert_close(official["Overall"], {"acc": 50.0, "precision": 50.0, "recall": 100.0,
                                       "f1": 200 / 3, "yes_ratio": 50.0})
    # score.rules overrides the file's format here as in score mode (the same predictions)
    preds = [json.loads(x) for x in (tmp_path / "work" / "predictions_none.jsonl").read_text().splitlines()]
    forced = default_config(**{"benchmark.name": "pope", "benchmark.file": saved["file"],
                               "score.rules": "vlmevalkit"})
    assert benchmark_rules(forced) == "vlmevalkit"
    assert eval_lib.summarize("pope", preds, "vlmevalkit")["official"]["Overall"]["acc"] == 75.0
    forced.score.rules = "lmms"
    with pytest.raises(SystemExit, match="score.rules 'lmms' is not auto"):
        run_benchmark(forced, tmp_path / "bad")
