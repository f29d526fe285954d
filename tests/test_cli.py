"""The CLIs end to end: the README's main job (evaluate.py study mode, after a train.py recipe),
the other evaluate.py modes, train.py and the benchmark scripts' quick modes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import jax.numpy as jnp
import numpy as np
from PIL import Image
from skimage import data

import vitsink_jax as vj
from conftest import device_env, jit_apply
from vitsink_jax.data.preprocess import load_image, preprocess
from vitsink_jax.data.prompts import ANALYSIS
from vitsink_jax.data.prompts import ImageSlots
from vitsink_jax.data.tokenizer import encode_prompt, load_tokenizer
from vitsink_jax.embedded import demo_prompt
from vitsink_jax.generate import generate
from vitsink_jax.provenance import file_stem

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.embedded.image_size=56", "--config.embedded.vision_hidden=48",
         "--config.embedded.vision_layers=2", "--config.embedded.text_hidden=64",
         "--config.embedded.text_layers=2", "--config.embedded.vocab_size=512"]
# interventions mode on the embedded default: 4 items, two decode steps timed
INTERVENTIONS_SMALL = ["--config.mode=interventions", "--config.compare.checkpoint=",
                       "--config.compare.mc_format=letter", "--config.compare.decode_steps=2",
                       "--config.benchmark.limit=4", "--config.benchmark.image_size=56"]


def photo_folder(tmp_path, photos: dict, broken: str, broken_bytes: bytes) -> Path:
    """A folder with real scikit-image photos ({file name: skimage loader}) and one bad file."""
    images = tmp_path / "images"
    images.mkdir()
    for name, loader in photos.items():
        Image.fromarray(loader()).save(images / name)
    (images / broken).write_bytes(broken_bytes)
    return images


def run_evaluate(work, images, *flags):
    """evaluate.py on the small embedded default (random weights) unless ``flags`` name a checkpoint."""
    proc = subprocess.run([sys.executable, "evaluate.py", f"--workdir={work}", "--config.checkpoint=embedded",
                           f"--config.images={images}", *flags, *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_demo_end_to_end_on_real_photos(tmp_path):
    images = photo_folder(tmp_path, {"astronaut.png": data.astronaut, "chelsea.jpg": data.chelsea},
                          "broken.jpg", b"\x00not a jpeg")
    work = tmp_path / "work"
    proc = run_evaluate(work, images, "--config.mode=demo")
    assert "2 image(s) processed, 1 skipped" in proc.stdout
    assert "broken.jpg: cannot read image" in proc.stdout
    # not a terminal: progress as whole lines, everything also in workdir/log.txt
    assert "\r" not in proc.stderr and "images: 100% 2/2 img" in proc.stderr
    log = (work / "log.txt").read_text()
    assert "2 image(s) processed, 1 skipped" in log and "images: 100% 2/2 img" in log
    report = json.loads((work / "demo.json").read_text())
    assert sorted(report["images"]) == ["astronaut.png", "chelsea.jpg"]
    assert report["seed"] == 0 and report["versions"]["jax"] and len(report["checkpoint_sha256"]) == 64
    # the reported norms agree with a direct computation through the public API
    model, params = vj.load_pretrained(work / "embedded_default")
    ids = jnp.asarray(demo_prompt(model.config))
    pixels = jnp.asarray(preprocess(model.config.vision, [load_image(images / "chelsea.jpg")]))
    out = jit_apply(model, {"params": params}, ids, pixels, output_vision=True)
    norms = np.linalg.norm(np.asarray(out.vision_features[0]), axis=-1)
    top = report["images"]["chelsea.jpg"]["top_tokens"][0]
    assert top["index"] == int(np.argmax(norms))
    np.testing.assert_allclose(top["norm"], norms.max(), rtol=1e-5)


IN_PROCESS = ("forward", "generate", "pruning", "bf16_loss", "eval_throughput", "mfu")


def run_benchmark_script(name: str, tmp_path) -> Path:
    """Runs benchmarks/<name>.py --quick; returns its JSON output file. The scripts of
    :data:`IN_PROCESS` (a plain ``main(argv)``, no process-wide settings) run in this process:
    an interpreter start with JAX and torch costs ~7 s of the suite each."""
    out = tmp_path / f"{name}.json"
    if name in IN_PROCESS:
        if str(ROOT / "benchmarks") not in sys.path:  # their own imports (after the stdlib's)
            sys.path.append(str(ROOT / "benchmarks"))
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.main(["--quick", f"--out={out}"])
        return out
    proc = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--quick", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_forward_benchmark_quick(tmp_path):
    out = run_benchmark_script("forward", tmp_path)
    result = json.loads(out.read_text())
    assert result["speedup_vs_hf"] > 0
    assert result["max_abs_logit_diff"] <= 1e-4 * max(1.0, result["ref_logit_scale"])
    assert result["sink_to_front_jit_s"] > 0


@pytest.mark.slow
def test_the_prepared_accelerator_run_fits_its_lease_and_gathers_results(tmp_path):
    """benchmarks/accelerator.py: the plan's budgets add up to at most 9 minutes; a quick run of
    one script records its result, status and the device kind in one JSON."""
    spec = importlib.util.spec_from_file_location("benchmark_accelerator", ROOT / "benchmarks" / "accelerator.py")
    accelerator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accelerator)
    assert sum(budget for _, _, budget in accelerator.PLAN) <= 540
    assert all((ROOT / "benchmarks" / f"{name}.py").is_file() for name, _, _ in accelerator.PLAN)
    out = tmp_path / "acc.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--quick", "--only",
                    "forward", f"--out={out}"], check=True, cwd=ROOT)
    result = json.loads(out.read_text())
    assert result["device_kind"] and list(result["runs"]) == ["forward"]
    assert result["runs"]["forward"]["status"] == "ok"
    assert result["runs"]["forward"]["result"]["speedup_vs_hf"] > 0


@pytest.mark.slow
def test_eval_throughput_benchmark_quick(tmp_path):
    """benchmarks/eval_throughput.py on a tiny shape: the three contenders run, ours chooses
    HF log-likelihood's options (the script fails otherwise) and never compiles after its
    first call."""
    r = json.loads(run_benchmark_script("eval_throughput", tmp_path).read_text())
    assert r["options_equal_hf_loglik"] and r["compiles_after_first_call"] == 0
    assert 1 <= r["first_call_compiles"] and r["max_abs_score_diff_vs_hf"] < 1e-4
    assert set(r["items_per_s"]) == {"ours", "hf_loglik", "hf_generate"}


@pytest.mark.slow
def test_input_pipeline_benchmark_quick(tmp_path):
    """The loader's rate per thread count, and the data-wait share of two short train.py runs:
    with the prefetch the step hardly waits (tiny steps: a generous bound), without it it does."""
    results = (ROOT / "benchmarks" / "results.json").read_text()
    result = json.loads(run_benchmark_script("input_pipeline", tmp_path).read_text())
    assert [x["workers"] for x in result["loader"]] == [1, 2]
    assert all(x["images_per_s"] > 0 and x["images"] == 4 * 8 for x in result["loader"])
    on, off = result["train_runs"]["on"][0], result["train_runs"]["off"][0]
    assert on["steps"] == off["steps"] == 3 and on["prefetch_wait_share"] is not None
    assert result["data_wait_share"]["on"] < 0.5 * result["data_wait_share"]["off"]
    assert (ROOT / "benchmarks" / "results.json").read_text() == results  # --quick writes none


@pytest.mark.slow
def test_data_build_benchmark_quick(tmp_path):
    """benchmarks/data_build.py on 100 and 200 rows: four builds (1 and 2 workers each), every
    row kept (text-only ones too), peak memory measured over the build's process tree. ~25 s:
    four fresh processes, each spawning its workers."""
    results = (ROOT / "benchmarks" / "results.json").read_text()
    r = json.loads(run_benchmark_script("data_build", tmp_path).read_text())
    assert [(x["source_rows"], x["workers"]) for x in r["runs"]] == [(100, 1), (100, 2), (200, 1), (200, 2)]
    assert all(x["rows"] == x["source_rows"] and x["skipped"] == 0 and x["peak_rss_bytes"] > 0
               for x in r["runs"])
    assert r["peak_rss_ratio"] > 0 and r["rate_two_workers_vs_one"] > 0
    assert (ROOT / "benchmarks" / "results.json").read_text() == results  # --quick writes none


@pytest.mark.slow
def test_train_step_benchmark_quick(tmp_path):
    """benchmarks/train_step.py on the tiny config: our step (train.py's runner) and HF's run,
    start from the same weights (same first loss), and report faults and CPU times per step."""
    r = json.loads(run_benchmark_script("train_step", tmp_path).read_text())
    assert r["speedup_vs_hf_sdpa"] > 0 and r["malloc"] == "kept"
    first = r["first_loss"]
    assert abs(first["ours_fp32"] - first["hf_sdpa"]) <= 1e-4 * first["hf_sdpa"]
    assert set(r["step"]) == {"ours_fp32", "hf_sdpa", "hf_eager"}
    for x in [*r["step"].values(), *r["profile_fp32"].values()]:
        assert x["wall_s"] > 0 and x["minor_faults"] >= 0 and x["sys_s"] >= 0


@pytest.mark.slow
def test_analyze_end_to_end_report_and_plots(tmp_path):
    images = photo_folder(tmp_path, {"coffee.png": data.coffee, "rocket.jpg": data.rocket},
                          "empty.png", b"")
    work = tmp_path / "work"
    proc = run_evaluate(work, images, "--config.mode=analyze", "--config.sink.rule=topk",
                        "--config.sink.k=3")
    assert "empty.png: cannot read image" in proc.stdout
    report = json.loads((work / "report.json").read_text())
    assert report["summary"]["images"] == 2 and report["summary"]["skipped"] == 1
    for png in ["norm_histogram", "attention_by_norm_bucket", "sink_dimensions", "sinks_coffee",
                "sinks_rocket", "relevance_coffee", "relevance_rocket"]:
        assert (work / "plots" / f"{png}.png").stat().st_size > 1000, png
    entry = report["per_image"]["coffee.png"]
    assert len(entry["sinks"]["topk"]) == 3
    # F1 figures agree with a direct numpy computation from the model's attention maps: the
    # queries are the answer the model generated (greedy) after the question prompt
    model, params = vj.load_pretrained(work / "embedded_default")
    c = model.config
    n = c.num_image_tokens
    tok = load_tokenizer(work / "embedded_default")
    prompt = encode_prompt(tok, ANALYSIS.format(question=report["config"]["analysis"]["question"]),
                           ImageSlots(n, c.image_token_index))
    pixels = jnp.asarray(preprocess(c.vision, [load_image(images / "coffee.png")]))
    gen = np.asarray(generate(model, params, jnp.asarray(prompt[None]), jnp.ones((1, len(prompt)), jnp.int32),
                              pixels, 16, (tok.eos_token_id,)))[0]
    answer = gen[:list(gen).index(tok.eos_token_id)] if tok.eos_token_id in gen else gen
    assert entry["answer_ids"] == answer.tolist() and entry["queries"] == len(answer) > 0
    ids = jnp.asarray(np.concatenate([prompt, answer])[None])
    out = jit_apply(model, {"params": params}, ids, pixels, output_attentions=True, output_vision=True)
    norms = np.linalg.norm(np.asarray(out.vision_features[0]), axis=-1)
    np.testing.assert_allclose(entry["norms"], norms, rtol=1e-5)
    sinks = np.argsort(-norms)[:3]
    assert sorted(entry["sinks"]["topk"]) == sorted(sinks.tolist())
    is_sink = np.isin(np.arange(n), sinks)
    slots = np.flatnonzero(prompt == c.image_token_index)
    for layer, a in enumerate(out.attentions):
        vis = np.asarray(a)[0][:, len(prompt):, slots].mean(axis=(0, 1))  # over heads and answer tokens
        ratio = vis[is_sink].mean() / vis[~is_sink].mean()
        np.testing.assert_allclose(entry["sink_ratio_per_layer"][layer], ratio, rtol=1e-4)
    # F4: the logit-lens words of the top-norm token agree with the model run on it alone
    f4 = entry["f4"]["targets"][0]
    assert f4["index"] == int(np.argmax(norms)) and f4["is_sink"]
    alone = jit_apply(model, {"params": params}, out.image_features, method=model.decode_isolated)
    assert [w["id"] for w in f4["decoded"]] == np.argsort(-np.asarray(alone[0, f4["index"]]))[:5].tolist()
    assert all(isinstance(w["token"], str) for w in f4["decoded"])  # the embedded tokenizer's words
    assert set(report["summary"]["f4_object_word_in_top_k"]) == {"sink", "non_sink"}


@pytest.mark.slow
def test_benchmark_end_to_end_side_by_side(tmp_path):
    work = tmp_path / "work"
    variants = '--config.variants=("none","front","none+sinks")'
    proc = run_evaluate(work, "", "--config.mode=benchmark", "--config.benchmark.limit=12",
                        "--config.benchmark.image_size=56",
                        variants, "--config.sink.rule=topk", "--config.sink.k=2")
    assert "variant\tsinks/img\toverall\ttag:global\ttag:local" in proc.stdout
    results = json.loads((work / "results.json").read_text())
    assert results["benchmark"] == "embedded" and len(results["checkpoint_sha256"]) == 64
    assert set(results["results"]) == {"none", "front", "none+sinks"}
    for spec, res in results["results"].items():
        preds = [json.loads(x) for x in (work / f"{file_stem('predictions', spec)}.jsonl").read_text().splitlines()]
        assert len(preds) == res["n"] == 12 and res["sinks_per_image"] == 2.0
        assert res["accuracy"] == np.mean([p["correct"] for p in preds])
        local = [p["correct"] for p in preds if p["tag"] == "local"]
        assert res["per_tag"]["local"]["acc"] == np.mean(local)
        assert all(p["prediction"] == "ABCD"[int(np.argmax(p["scores"]))] for p in preds)
    # the variants really change the model's input: scores differ between orders
    none = [json.loads(x)["scores"] for x in (work / "predictions_none.jsonl").read_text().splitlines()]
    front = [json.loads(x)["scores"] for x in (work / "predictions_front.jsonl").read_text().splitlines()]
    assert not np.allclose(none, front)
    assert (work / "predictions_none_sinks.jsonl").is_file()  # file names in [a-z0-9_.-]


def _predictions(work, spec):
    return [json.loads(x) for x in (work / f"predictions_{spec}.jsonl").read_text().splitlines()]


def _same_predictions(a, b):
    assert [x["index"] for x in a] == [x["index"] for x in b]
    assert [x["prediction"] for x in a] == [x["prediction"] for x in b]
    if "scores" in a[0]:
        np.testing.assert_allclose([x["scores"] for x in a], [x["scores"] for x in b], atol=1e-5)


@pytest.mark.slow
def test_benchmark_on_two_processes_equals_one(tmp_path):
    """evaluate.py as two jax.distributed processes (2 CPU devices each), each with a workdir of
    its own (no shared files: each builds its own embedded checkpoint and tfds shard, the
    predictions meet through a collective), gives the one-process scores; only process 0 writes
    results."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--config.mode=benchmark", "--config.checkpoint=embedded", "--config.benchmark.limit=6",
              '--config.variants=("none",)', "--config.benchmark.image_size=56", "--config.eval.batch_size=2", *SMALL]
    single = run_evaluate(tmp_path / "one", "", *common)
    assert single.returncode == 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    dist = [f"--config.distributed.coordinator=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", "--config.distributed.local_device_count=2"]
    procs = [subprocess.Popen([sys.executable, "evaluate.py", f"--workdir={tmp_path / f'two{i}'}",
                               *common, *dist, f"--config.distributed.process_id={i}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert not (tmp_path / "two1" / "results.json").exists()
    assert not list((tmp_path / "two0").glob("*.p[0-9].json"))  # no per-host merge files
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two0" / "results.json").read_text())
    assert two["processes"] == 2
    assert two["results"]["none"]["accuracy"] == one["results"]["none"]["accuracy"]
    _same_predictions(_predictions(tmp_path / "one", "none"), _predictions(tmp_path / "two0", "none"))


@pytest.mark.slow
def test_sharded_evaluation_equals_replicated(tmp_path):
    """eval.fsdp=2 x eval.tensor=2 over 8 devices (params created on their shards) scores and
    generates what the replicated default does."""
    env = device_env(8, VITSINK_JAX_CACHE=str(tmp_path / "xla"))  # the runs, one after another, share programs
    common = ["--config.mode=benchmark", "--config.checkpoint=embedded", "--config.benchmark.limit=8",
              '--config.variants=("none",)', "--config.benchmark.image_size=56", "--config.eval.batch_size=8",
              *SMALL]
    for scoring in ("loglik", "generate"):
        runs = {}
        for name, extra in (("replicated", []), ("sharded", ["--config.eval.fsdp=2", "--config.eval.tensor=2"])):
            work = tmp_path / f"{scoring}_{name}"
            proc = subprocess.run([sys.executable, "evaluate.py", f"--workdir={work}", *common, *extra,
                                   f"--config.eval.scoring={scoring}"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[name] = _predictions(work, "none")
        _same_predictions(runs["replicated"], runs["sharded"])


@pytest.mark.slow
def test_generate_benchmark_quick(tmp_path):
    out = run_benchmark_script("generate", tmp_path)
    result = json.loads(out.read_text())
    assert result["tokens_equal"] and result["speedup_vs_hf"] > 0


@pytest.mark.slow
def test_pruning_benchmark_quick(tmp_path):
    rows = json.loads(run_benchmark_script("pruning", tmp_path).read_text())["results"]
    assert rows["stock"]["prefill_speedup"] == 1.0 and rows["fastv:0.5:1"]["visual_tokens_kept"] == 8
    assert rows["fastv:0.5:1"]["decode_step_s"] > 0


@pytest.mark.slow
def test_bf16_loss_benchmark_quick(tmp_path):
    rows = json.loads(run_benchmark_script("bf16_loss", tmp_path).read_text())["results"]
    for r in rows.values():
        assert not r["bf16"]["logits_on_bf16_grid"]  # the head's float32 output
        assert r["abs_loss_diff"] < 1e-2 * r["fp32"]["loss"]
    assert 19.0 < rows["max_logit_20"]["fp32"]["max_abs_logit"] < 21.0


@pytest.mark.slow
def test_memory_benchmark_quick(tmp_path):
    out = run_benchmark_script("memory", tmp_path)
    (entry,) = json.loads(out.read_text())["results"]
    r = entry["scan"]  # the quick run compiles the scanned layout only (the loop's is the default)
    assert r["fsdp"]["scan_layers"] and r["fsdp"]["devices"] == 8
    assert r["fsdp"]["per_device_bytes"] < r["one_device"]["per_device_bytes"]
    assert r["inference_tensor"]["per_device_bytes"] < r["inference_one_device"]["per_device_bytes"]


@pytest.mark.slow
def test_io_benchmark_quick(tmp_path):
    """benchmarks/io.py on a tiny shape: every phase runs (8-device load, two processes, save,
    transformers parity); the byte accounting and the 7B plan hold at any size."""
    r = json.loads(run_benchmark_script("io", tmp_path).read_text())
    f = r["figures"]
    assert r["load"]["devices"] == 8 and len(r["load"]["per_device_bytes"]) == 8
    assert sum(m["held_bytes"] for m in r["two_processes"]) == sum(r["load"]["per_device_bytes"].values())
    assert r["load"]["save_files"] > 2 and f["parity_relative"] < 1e-4
    assert r["load"]["llava_1_5_7b_plan"]["vs_total_over_n"] < 1.02  # fsdp=8 splits the 7B evenly


@pytest.mark.slow
def test_mfu_benchmark_quick(tmp_path):
    """The accelerator script runs (tiny shape, here on the CPU); its FLOP formula agrees with
    XLA's count of the same forward."""
    r = json.loads(run_benchmark_script("mfu", tmp_path).read_text())
    assert abs(r["flops_formula_vs_xla"] - 1) < 0.02, r["flops_formula_vs_xla"]
    assert 0 < r["prefill_mfu"] and 0 < r["train_step_mfu"] and r["device_kind"]


@pytest.mark.slow
def test_mini_study_recipe_publish_then_the_study_main_job(tmp_path):
    """train.py runs a recipe on the real DINOv2-S tower and publishes the models without it;
    evaluate.py's default mode (the main job) analyses the real tower's sinks and scores the
    published models side by side."""
    import os

    from safetensors.numpy import load_file

    from vitsink_jax import mini_study

    env = {**os.environ, "VITSINK_CACHE": str(tmp_path / "cache")}  # a fresh import of the tower
    work = tmp_path / "study"
    recipe = ('--config.recipe=("single: diysink.enabled=False", "diysink: stage=rew '
              'diysink.reweight=True batch_size=4")')
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/mini_study.py",
                           f"--workdir={work}", recipe, "--config.publish.diysink=diysink", "--config.steps=2", "--config.batch_size=2",
                           "--config.embedded.image_size=28", "--config.data.image_size=28",
                           "--config.data.variants=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pub = work / "published"
    record = json.loads((pub / "training_record.json").read_text())
    assert sorted(record["runs"]) == ["diysink", "single"] and record["recipe"][0].startswith("single")
    assert len(record["runs"]["diysink"]["loss_curve"]) == 2
    assert record["runs"]["diysink"]["config"]["stage"] == "rew"
    for name, run in (("single", "single"), ("diysink", "diysink")):
        assert not [k for k in load_file(str(pub / name / "model.safetensors")) if "vision_tower" in k]
        exported = vj.load_pretrained(work / run / "export")[1]
        assembled = vj.load_pretrained(mini_study.assemble(pub / name, tmp_path / "asm"))[1]
        for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(assembled)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    images = photo_folder(tmp_path, {"chelsea.png": data.chelsea}, "notes.txt", b"")
    proc = subprocess.run([sys.executable, "evaluate.py", f"--workdir={tmp_path / 'main'}",
                           f"--config.images={images}", "--config.benchmark.limit=4",
                           "--config.benchmark.image_size=28",
                           f"--config.study.models=('{pub / 'single'}', '{pub / 'diysink'}')"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (a) the real tower's ViT sinks
    report = json.loads((tmp_path / "main" / "vit" / "vit_report.json").read_text())
    entry = report["per_image"]["chelsea.png"]
    assert len(entry["norms"]) == 37 * 37 and len(entry["sinks"]["topk"]) == 4
    assert report["summary"]["sinks_per_image"]["threshold"] == 0.0  # DINOv2-S: no norm > 100
    assert "no token reaches the fixed threshold" in proc.stdout
    for png in ("norm_histogram", "sinks_chelsea", "relevance_chelsea"):
        assert (tmp_path / "main" / "vit" / "plots" / f"{png}.png").stat().st_size > 1000
    # (b) one table: the single MLP in both orders, DIYSink once (it puts its sinks first itself:
    # a "front" row would be a second name for the same computation), global / local columns
    study = json.loads((tmp_path / "main" / "study.json").read_text())
    assert sorted(study["results"]) == ["diysink none", "single front", "single none"]
    assert [row.split("\t")[0] for row in study["table"].splitlines()[1:]] == [
        "single none", "single front", "diysink none"]
    assert list(study["skipped_variants"]["diysink"]) == ["front"] and not study["skipped_variants"]["single"]
    assert "variant\tsinks/img\toverall\ttag:global\ttag:local" in proc.stdout
    for res in study["results"].values():
        assert res["n"] == 4 and res["sinks_per_image"] == 4.0  # DIYSink / study rule: top-4
    assert study["vit_summary"]["images"] == 1 and len(study["checkpoints"]["single"]["sha256"]) == 64


@pytest.mark.slow
def test_interventions_side_by_side(tmp_path):
    """Every kind of intervention in one run (one process): pruning in the LLM, VAR both ways,
    test-time registers, and token reductions before the LLM (FasterVLM, DivPrune)."""
    specs = ('--config.compare.specs=("stock","fastv+sinks:0.5:1","var-vit:0.6:0","var:0.6:0","registers:4",'
             '"fastervlm:0.5","divprune:0.25")')
    proc = run_evaluate(tmp_path / "work", "", specs, *INTERVENTIONS_SMALL)
    assert ("intervention\ttokens kept\tViT sinks kept\toverall\ttag:global\ttag:local\t"
            "prefill x stock time (min-max)\tdecode step x stock time (min-max)") in proc.stdout
    report = json.loads((tmp_path / "work" / "interventions.json").read_text())
    res = report["results"]
    assert res["stock"]["visual_tokens_kept"] == 16 and res["fastv+sinks:0.5:1"]["visual_tokens_kept"] == 8
    assert res["stock"]["prefill_vs_first"] == 1.0 and res["fastv+sinks:0.5:1"]["decode_step_s"] > 0
    lo, hi = res["fastv+sinks:0.5:1"]["prefill_vs_first_range"]  # timed in turns with stock
    assert 0 < lo <= res["fastv+sinks:0.5:1"]["prefill_vs_first"] <= hi
    assert res["var-vit:0.6:0"]["decode_vs_first"] > 0  # VAR also runs with the KV cache
    # every image's ViT sinks (the family rule: top-k) kept by the keep-all specs and by
    # sink-aware FastV, which never drops one
    assert res["stock"]["vit_sinks_kept"] == res["fastv+sinks:0.5:1"]["vit_sinks_kept"] == 1.0
    assert len(res["registers:4"]["register_neurons"]) == 4 and res["var-vit:0.6:0"]["n"] == 4
    # VAR's official sinks need the LLM's sink dimensions: a random tiny LLM has none to find
    assert "no LLM sink dimension" in report["not_run"]["var:0.6:0"] and "var:0.6:0" not in res
    assert (tmp_path / "work" / "plots" / "accuracy_vs_tokens_kept.png").stat().st_size > 1000
    assert [res[s]["visual_tokens_kept"] for s in ("fastervlm:0.5", "divprune:0.25")] == [8, 4]
    assert res["fastervlm:0.5"]["n"] == 4 and res["fastervlm:0.5"]["prefill_s"] > 0
    assert res["divprune:0.25"]["without_cls"] == "no [CLS] needed" and res["stock"]["without_cls"] is None
    assert "fastervlm:0.5\t8\t" in proc.stdout
    assert 0 <= res["fastervlm:0.5"]["vit_sinks_kept"] <= 1 and 0 <= res["divprune:0.25"]["vit_sinks_kept"] <= 1


@pytest.mark.slow
def test_tau_sweep_with_a_finding5_labels_file(tmp_path, capsys):
    """sweep mode: one row per tau and the adaptive rule, sinks per image falling as tau grows;
    the labels file's tags (joined by index) replace the benchmark's in the per-tag scores.
    (~25 s: run_sweep in this process, five scoring passes over 12 items.)"""
    import importlib.util

    from vitsink_jax.data.synthetic import embedded_benchmark
    from vitsink_jax.modes.sweep import run_sweep

    index = [r["index"] for r in embedded_benchmark(0, 2, 56)[:12]]
    labels = tmp_path / "labels.csv"
    labels.write_text("index,image_complexity,question_globalness\n" + "".join(
        f"{i},{'low' if n < 3 else 'high'},{'high' if n < 3 else 'low'}\n" for n, i in enumerate(index[:7])))
    spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.mode, cfg.checkpoint, cfg.benchmark.limit, cfg.benchmark.image_size = "sweep", "embedded", 12, 56
    cfg.benchmark.labels, cfg.sweep.taus = str(labels), (0.0, 25.0, 1e9)
    for flag in SMALL:  # --config.embedded.<key>=<int>
        key, value = flag.removeprefix("--config.embedded.").split("=")
        cfg.embedded[key] = int(value)
    work = tmp_path / "work"
    run_sweep(cfg, work)
    proc = capsys.readouterr()  # .out: the printed lines
    assert "7 items tagged {'global': 3, 'local': 4, 'mixed': 0}, 5 unlabelled" in proc.out
    report = json.loads((work / "sweep.json").read_text())
    rows = report["results"]
    assert set(rows) == {"tau=0", "tau=25", "tau=1e+09", "adaptive"}
    sinks = [rows[n]["sinks_per_image"] for n in ("tau=0", "tau=25", "tau=1e+09")]
    assert sinks[0] == 16 and sinks[0] >= sinks[1] >= sinks[2] == 0  # all 4 x 4 tokens, some, none
    assert report["reference"]["sinks_per_image"] is None
    # no sink: sink-to-the-front is the stock order, so the reference's scores come back exactly
    assert rows["tau=1e+09"]["accuracy"] == report["reference"]["accuracy"]
    for r in [report["reference"], *rows.values()]:
        assert {t: v["n"] for t, v in r["per_tag"].items()} == {"global": 3, "local": 4}
    assert (work / "plots" / "tau_sweep.png").stat().st_size > 1000


@pytest.mark.slow
def test_analyze_leaves_out_an_image_with_an_empty_answer(tmp_path, monkeypatch):
    """An image the model answers with EOS first has no query: it is left out of the per-image
    entries and the F1 figures and counted as ``empty_answers`` (not entered as sink and
    non-sink means of 0.0)."""
    from conftest import evaluate_config
    from vitsink_jax.modes import analyze

    cfg = evaluate_config(tmp_path, "")  # the embedded default, small
    cfg.embedded.update({f.split("=")[0].split(".")[-1]: int(f.split("=")[1]) for f in SMALL})
    cfg.analysis.max_new_tokens, cfg.sink.rule, cfg.sink.k = 4, "topk", 3
    Image.fromarray(data.rocket()).save(tmp_path / "images" / "rocket.png")  # beside coffee.png
    real = analyze.analysis_prompt

    def empty_for_the_second(cfg, model, params, tokenizer, pixels):
        row, answer = real(cfg, model, params, tokenizer, pixels)
        calls.append(1)
        if len(calls) == 2:
            row = {**row, "query": np.zeros_like(row["query"])}
        return row, answer

    calls = []
    monkeypatch.setattr(analyze, "analysis_prompt", empty_for_the_second)
    report = analyze.run_analyze(cfg, tmp_path / "work")
    assert report["summary"]["images"] == 1 and report["summary"]["empty_answers"] == 1
    assert list(report["per_image"]) == ["coffee.png"] and report["empty_answer_files"] == ["rocket.png"]
    entry = report["per_image"]["coffee.png"]
    assert report["summary"]["f1_sink_to_nonsink_attention_ratio"] == pytest.approx(
        np.mean(entry["attention_per_token_per_layer"]["sink"]) / np.mean(entry["attention_per_token_per_layer"]["non_sink"]))
