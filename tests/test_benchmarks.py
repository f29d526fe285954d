"""Benchmark files on disk -> records -> tfds builders; the embedded benchmark generator."""

import base64
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from vitsink_jax.data import benchmarks as B
from vitsink_jax.data.synthetic import CORNERS, SUBJECTS, embedded_benchmark
from test_scores import run_benchmark_mode


def png(seed=0, size=8) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(seed=0) -> str:
    return base64.b64encode(png(seed)).decode()


def write_tsv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return path


def test_vlmevalkit_mmstar_tsv(tmp_path):
    rows = [dict(index=0, question="What is shown?", A="a cat", B="a dog", C="a car", D="a tree",
                 answer="B", category="coarse perception", **{"l2-category": "image scene"},
                 image=b64(0)),
            dict(index=1, question="Colour?", A="red", B="green", C="", D="", answer="A",
                 category="fine-grained", **{"l2-category": "attr"}, image="0")]  # image reference
    recs, skipped = B.read_benchmark(write_tsv(tmp_path / "MMStar.tsv", rows), "mmstar")
    assert not skipped and len(recs) == 2
    assert recs[0]["options"] == ["a cat", "a dog", "a car", "a tree"] and recs[0]["answer"] == "B"
    assert recs[1]["options"] == ["red", "green"]  # empty option columns end the list
    assert recs[1]["image"] == recs[0]["image"] == png(0)
    assert recs[0]["kind"] == "mc" and recs[0]["category"] == "coarse perception"


def test_mme_and_pope_tsv(tmp_path):
    rows = [dict(index=i, category="existence", image_path=f"img{i // 2}.jpg",
                 question=f"Is there a cat? {i}", answer=["Yes", "No"][i % 2], image=b64(i))
            for i in range(4)]
    recs, _ = B.read_benchmark(write_tsv(tmp_path / "MME.tsv", rows), "mme")
    assert [r["answer"] for r in recs] == ["yes", "no", "yes", "no"]
    assert [r["group"] for r in recs] == ["img0.jpg", "img0.jpg", "img1.jpg", "img1.jpg"]
    assert all(r["kind"] == "yesno" and r["options"] == [] for r in recs)
    pope = [dict(image=b64(i), question="Is there a dog?", answer="no", category="adversarial",
                 index=i) for i in range(2)]
    recs, _ = B.read_benchmark(write_tsv(tmp_path / "POPE.tsv", pope), "pope")
    assert recs[0]["category"] == "adversarial" and recs[0]["answer"] == "no"


def test_lmms_eval_json_layouts(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(3))
    cvbench = [{"idx": 0, "question": "Which is closer?", "choices": ["the lamp", "the bed"],
                "answer": "(B)", "task": "Depth", "type": "3D", "image": "imgs/a.png"}]
    (tmp_path / "cv.json").write_text(json.dumps(cvbench))
    recs, _ = B.read_benchmark(tmp_path / "cv.json", "cvbench")
    assert recs[0]["answer"] == "B" and recs[0]["category"] == "Depth" and recs[0]["image"] == png(3)
    sqa = [{"question_id": "q1", "question": "Which is a mammal?", "hint": "Look closely.",
            "choices": ["frog", "whale", "shark"], "answer": 1, "image": b64(4)}]
    (tmp_path / "sqa.jsonl").write_text("\n".join(json.dumps(r) for r in sqa))
    recs, _ = B.read_benchmark(tmp_path / "sqa.jsonl", "scienceqa")
    assert recs[0]["answer"] == "B" and recs[0]["question"].startswith("Hint: Look closely.\n")
    mathvista = [{"pid": "1", "question": "How many?", "choices": None, "answer": "3",
                  "question_type": "free_form", "answer_type": "integer", "image": b64(5)},
                 {"pid": "2", "question": "Which?", "choices": ["12", "14"], "answer": "14",
                  "question_type": "multi_choice", "answer_type": "text", "image": b64(6)}]
    (tmp_path / "mv.json").write_text(json.dumps(mathvista))
    recs, _ = B.read_benchmark(tmp_path / "mv.json", "mathvista")
    assert (recs[0]["kind"], recs[0]["answer_type"]) == ("open", "integer")
    assert (recs[1]["kind"], recs[1]["answer"]) == ("mc", "B")
    gqa = [{"question_id": "7", "question": "What colour is the car?", "answer": "Red",
            "imageId": "n1", "image": b64(7)}]
    (tmp_path / "gqa.jsonl").write_text(json.dumps(gqa[0]))
    recs, _ = B.read_benchmark(tmp_path / "gqa.jsonl", "gqa")
    assert (recs[0]["kind"], recs[0]["answer"], recs[0]["group"]) == ("open", "Red", "n1")


def test_bad_input_is_named(tmp_path):
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(B.BenchmarkError, match="empty.tsv: the file is empty"):
        B.read_benchmark(tmp_path / "empty.tsv", "mmstar")
    no_answer = write_tsv(tmp_path / "noans.tsv", [dict(index=0, question="q", A="x", image=b64())])
    with pytest.raises(B.BenchmarkError, match="noans.tsv: missing column 'answer'"):
        B.read_benchmark(no_answer, "mmstar")
    with pytest.raises(B.BenchmarkError, match="unknown benchmark 'foo'"):
        B.read_benchmark(no_answer, "foo")
    rows = [dict(index=0, question="q", A="x", B="y", answer="A", image=b64()),
            dict(index=1, question="q", A="x", B="y", answer="A", image="!!not base64!!"),
            dict(index=2, question="q", A="x", B="y", answer="E", image=b64()),
            dict(index=3, question="q", A="x", B="y", answer="B", image=base64.b64encode(b"junk").decode())]
    recs, skipped = B.read_benchmark(write_tsv(tmp_path / "bad.tsv", rows), "mmstar", verbose=False)
    assert [r["index"] for r in recs] == ["0"]
    assert len(skipped) == 3
    assert "bad.tsv:row 2" in skipped[0] and "field 'image'" in skipped[0]
    assert "bad.tsv:row 3" in skipped[1] and "field 'answer'" in skipped[1] and "'E'" in skipped[1]
    assert "row 4" in skipped[2] and "does not decode" in skipped[2]
    all_bad = write_tsv(tmp_path / "allbad.tsv", rows[1:2])
    with pytest.raises(B.BenchmarkError, match="all 1 rows were skipped"):
        B.read_benchmark(all_bad, "mmstar", verbose=False)


def test_tfds_roundtrip_and_host_shards(tmp_path):
    recs = embedded_benchmark(seed=1, variants=1, size=32, photos=["chelsea", "coffee", "rocket"])
    B.build_tfds(recs, "tiny", tmp_path)
    back = B.load_tfds("tiny", tmp_path)
    assert back == recs  # every field, order kept
    shards = [B.load_tfds("tiny", tmp_path, i, 2) for i in range(2)]
    assert sorted(r["index"] for s in shards for r in s) == sorted(r["index"] for r in recs)
    assert all(shards)


def test_embedded_benchmark_answers_are_true():
    recs = embedded_benchmark(seed=0, variants=2, size=64, photos=["chelsea", "astronaut"])
    assert len(recs) == 12 and {r["tag"] for r in recs} == {"global", "local"}
    for r in recs:
        truth = r["options"][" ABCD".index(r["answer"]) - 1]
        img = np.asarray(Image.open(io.BytesIO(r["image"])))
        if r["category"] == "scene":
            assert truth == SUBJECTS[r["group"]]
        elif r["category"] == "counting":  # count the red squares' pixels
            red = (img[..., 0] == 230) & (img[..., 1] == 20)
            side = 64 // 14
            assert round(red.sum() / (side - 2) ** 2) == int(truth)
        else:
            blue = np.argwhere((img[..., 2] == 230) & (img[..., 0] == 20)).mean(0)
            assert CORNERS[2 * int(blue[0] > 32) + int(blue[1] > 32)] == truth
    assert embedded_benchmark(seed=0, variants=2, size=64, photos=["chelsea", "astronaut"]) == recs


def test_finding5_labels_file_joins_by_index(tmp_path):
    from vitsink_jax.data.labels import LabelsError, apply_labels

    records = [{"index": str(i), "tag": "", "question": "q"} for i in range(5)]
    tags = tmp_path / "labels.csv"
    tags.write_text("index,tag\n0,global\n1,Local\n3,mixed\n99,global\n")
    out, info = apply_labels(records, tags)
    assert [r["tag"] for r in out] == ["global", "local", "", "mixed", ""]
    assert info["labelled"] == 3 and info["unlabelled"] == 2 and info["labels_not_in_benchmark"] == 1
    assert len(info["sha256"]) == 64
    # the paper's two axes: low complexity + high globalness = global, the reverse = local
    axes = tmp_path / "axes.jsonl"
    axes.write_text("\n".join(json.dumps(r) for r in [
        {"index": 0, "image_complexity": "low", "question_globalness": "high"},
        {"index": 1, "image_complexity": "high", "question_globalness": "low"},
        {"index": 2, "image_complexity": "high", "question_globalness": "high"}]))
    assert [r["tag"] for r in apply_labels(records, axes)[0]][:3] == ["global", "local", "mixed"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\ttag\n0\tglobal\n0\tlocal\n")
    with pytest.raises(LabelsError, match=r"bad.tsv:row 2: index 0 is labelled twice"):
        apply_labels(records, bad)
    bad.write_text("index\ttag\n0\tsometimes\n")
    with pytest.raises(LabelsError, match=r"row 1: tag 'sometimes' not one of"):
        apply_labels(records, bad)
    bad.write_text("index\ttag\n77\tglobal\n")
    with pytest.raises(LabelsError, match="none of its 1 indices"):
        apply_labels(records, bad)


def test_finding5_unmatched_labels_are_counted_named_and_a_shift_is_spotted(tmp_path):
    from vitsink_jax.data.labels import LabelsError, apply_labels, summary_line

    records = [{"index": str(i), "tag": "", "question": "q"} for i in range(5)]
    tags = tmp_path / "labels.csv"   # counted from 1: 5 matches no row; all match shifted by -1
    tags.write_text("index,tag\n1,global\n2,local\n5,mixed\n")
    _, info = apply_labels(records, tags)
    assert info["labels_not_in_benchmark"] == 1 and info["labels_not_in_benchmark_first"] == ["5"]
    assert info["shift_hint"].startswith("every label index - 1 is a benchmark index")
    line = summary_line(info)
    assert "1 label(s) match no benchmark index, e.g. 5; every label index - 1" in line
    tags.write_text("index,tag\n0,global\n9,local\n")   # no shift explains 9
    _, info = apply_labels(records, tags)
    assert info["labels_not_in_benchmark_first"] == ["9"] and info["shift_hint"] == ""
    tags.write_text("index,tag\n2,global\n")   # rows 0-1: no direct match, 2 - 1 is one
    with pytest.raises(LabelsError, match=r"none of its 1 indices .*; every label index - 1"):
        apply_labels(records[:2], tags)


# ------------------------------------------- issue 35 point 2: overlong benchmark rows ---

def test_a_benchmark_row_longer_than_the_model_is_skipped_named_and_counted(tmp_path, benchmark_checkpoint, capsys):
    """One 100,000-character question among POPE rows (it ended a run with a 783 GB allocation):
    skipped before anything is scored, named with its length and the limit in one line and in
    results.json; the other rows score as in the run without it. ``eval.max_length`` lowers
    the limit (the LLM's 256 positions here)."""
    rows = [dict(question_id=i, question=f"Is there a dog {i}?", answer=a, category="random")
            for i, a in enumerate(["yes", "no", "yes", "no"])]
    huge = dict(question_id=9, question="Is there a dog? " * 6250, answer="yes", category="random")
    saved = run_benchmark_mode(tmp_path, benchmark_checkpoint, "pope", rows[:2] + [huge] + rows[2:])
    skipped = saved["skipped_too_long"]
    assert skipped["count"] == 1 and skipped["limit"] == 256
    assert skipped["first"][0]["index"] == "9" and skipped["first"][0]["tokens"] > 10_000
    out = capsys.readouterr().out
    assert (f"benchmark pope: 1 row(s) skipped, longer than the limit of 256 positions "
            f"(--config.eval.max_length; 0: the model's): index 9 ({skipped['first'][0]['tokens']} tokens)") in out
    alone = run_benchmark_mode(tmp_path, benchmark_checkpoint, "pope", rows, work="alone")
    assert alone["skipped_too_long"] == {"count": 0, "limit": 256, "first": []}
    assert saved["results"] == alone["results"]
    assert (tmp_path / "work" / "predictions_none.jsonl").read_text() == \
        (tmp_path / "alone" / "predictions_none.jsonl").read_text()
    with pytest.raises(SystemExit, match="every row of benchmark pope is longer than the limit of 8 positions"):
        run_benchmark_mode(tmp_path, benchmark_checkpoint, "pope", rows, work="short", **{"eval.max_length": 8})
