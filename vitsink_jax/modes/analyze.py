"""Analyze mode: the paper's sink analysis, Findings 1-4, over a folder of images.

Per image (paper Sec. 3, ``docs/analysis.md``): the visual-token norms and the ViT sinks under
every rule (Sec. 2); F1 (Sec. 3.1, Fig. 3A) the attention one sink token receives from the
answer's tokens against one non-sink token, per LLM layer and by norm bucket; F2 the attention
share of one non-sink, LLM-emerged-sink and propagated-ViT-sink token; F3 (Fig. 3B/C) the
hidden dimensions each group fires; F4 (Sec. 3.2, Fig. 4) the relevance maps of the largest-norm
tokens and the logit-lens words of each token processed alone. The queries are the paper's:
the model answers ``analysis.question`` (greedy) and its answer tokens' attention is read from
one teacher-forced forward over prompt + answer. The figures are pure functions
(:mod:`vitsink_jax.sinks.analysis`); this module prompts, loops over the images and writes
``workdir/report.json`` and the PNG plots under ``workdir/plots``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import eval_lib, plots
from ..data import prompts
from ..data.preprocess import model_view, preprocess, to_rgb
from ..generate import generate
from ..outputs import write_json
from ..progress import progress, write as progress_line
from ..provenance import file_stem
from ..sinks import analysis, detect
from .common import (all_rules, checkpoint_record, load_lvlm, read_images, require_tokenizer, sink_rule,
                     sinks_per_image)


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
    answer; ``analysis.queries="after_image"`` takes every prompt token after the image instead.
    Per image :func:`analyze_image`, then the summary over images (:func:`analysis_summary`) and
    the pooled plots; returns and writes ``report.json``."""
    ckpt, model, params = load_lvlm(cfg, workdir)
    if cfg.analysis.queries not in analysis.QUERIES:
        raise SystemExit(f"error: analysis.queries {cfg.analysis.queries!r} not one of {analysis.QUERIES}")
    tokenizer = require_tokenizer(ckpt, "the analysis prompts the model with a question and needs its "
                                        "tokenizer")
    rule = sink_rule(cfg, model.config.vision)
    forward = analysis_forward(cfg, model, rule)
    images, skipped = read_images(cfg.images)
    per_image, buckets, profiles = {}, [], []
    empty = []  # images whose answer is empty (EOS first): no query, so no attention to read
    for name, image in progress(images.items(), desc="analyzing", unit="img"):
        done = analyze_image(cfg, (model, params, tokenizer), forward, rule, name, image, workdir)
        if done is None:
            empty.append(name)
            continue
        per_image[name], bucket, profile = done
        buckets.append(bucket)
        profiles.append(profile)
    if not per_image:
        raise SystemExit(f"error: no readable image with a non-empty answer ({len(empty)} empty answers)")
    summary = analysis_summary(cfg, per_image, skipped, empty)
    plot_pooled(cfg, rule, per_image, buckets, profiles, workdir)
    report = {**checkpoint_record(cfg, ckpt), "summary": summary,
              "per_image": per_image, "skipped_files": skipped, "empty_answer_files": empty}
    out = write_json(workdir / "report.json", report)
    ratio = summary["f1_sink_to_nonsink_attention_ratio"]
    print("sinks per image: " + ", ".join(f"{n} {v:.1f}" for n, v in summary["sinks_per_image"].items())
          + (f"; F1 sink/non-sink attention ratio {ratio:.2f}x" if np.isfinite(ratio)
             else f"; F1 ratio undefined: no token passed the {rule.rule} rule"))
    print(f"wrote {out} and plots in {workdir / 'plots'}")
    return report


def analysis_forward(cfg, model, rule):
    """The jitted ``forward(params, ids, mask, query, question, pixels)`` of one analysis row
    (:func:`analysis_prompt`) -> :func:`vitsink_jax.sinks.analysis.analyze_forward`'s figures
    (sinks by ``rule``) and: ``masks`` {rule name: sink mask [1, P]} for every rule; F4's
    ``f4_targets`` [1, 3] (two largest norms, the median; stock order), ``f4_tower`` [1, 3] (their
    ViT token indices), ``relevance`` [1, 3, g, g] (their ViT attention columns, mean over heads),
    and the logit lens of every visual token processed alone (``decoded`` / ``decoded_p``
    [1, P, top_k], stock order)."""
    c, rules = model.config, all_rules(cfg)
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
        res["f4_targets"] = analysis.relevance_targets(res["norms"])
        vit_attn = out.vision_outputs.attentions[analysis.vit_attention_layer(c.feature_layers[-1])]
        res["f4_tower"] = jnp.take_along_axis(out.vision_token_index, res["f4_targets"], axis=1)
        res["relevance"] = analysis.relevance_maps(vit_attn, res["f4_tower"], c.grid_size,
                                                   prefix).mean(axis=1)           # [1, 3, g, g]
        feats = analysis.stock_order(out.image_features, out.visual_arrangement)
        logits = model.apply({"params": params}, feats, method=model.decode_isolated)
        res["decoded"], res["decoded_p"] = analysis.top_decoded(logits, cfg.top_k)
        return res

    return forward


def analyze_image(cfg, loaded: tuple, forward, rule, name: str, image, workdir: Path):
    """One image through the analysis with the model of ``loaded`` (model, params, tokenizer):
    (its report.json entry (:func:`image_entry`, :func:`f4_entry`), its mean attention per norm
    bucket [L, K] (mean over heads), its dimension profile per group {group: [L, D]}), its plots
    drawn (:func:`plot_image`); None when the model's answer is empty (no query to read)."""
    model, params, tokenizer = loaded
    pixels = jnp.asarray(preprocess(model.config, [image]))
    row, answer = analysis_prompt(cfg, model, params, tokenizer, pixels)
    if not row["query"].any():
        progress_line(f"{name:>14}: empty answer, left out")
        return None
    res = jax.device_get(forward(params, row["ids"], row["mask"], row["query"], row["question"], pixels))
    entry = image_entry(res, row, answer)
    sinks = entry["sinks"]
    entry["f4"] = f4_entry(res, entry["norms"], sinks[rule.rule], tokenizer,
                           cfg.object_words.get(Path(name).stem))
    plot_image(model.config, image, name, res, entry, rule, workdir)
    progress_line(f"{name:>14}: {len(sinks[rule.rule])} sink(s) by {rule.rule} "
                  f"(max norm {entry['norms'].max():.1f}); threshold {len(sinks['threshold'])}, "
                  f"top-k {len(sinks['topk'])}, adaptive {len(sinks['adaptive'])}")
    return entry, _nanmean(res["bucket_mean"], axis=1), {g: p.mean(0) for g, p in res["dim_profile"].items()}


def image_entry(res: dict, row: dict, answer: str) -> dict:
    """report.json's figures of one image from its forward's ``res``: the answer, the queries,
    the norms [P], the sinks {rule: indices}, F1's sink ratio and attention per token per layer,
    F2's attention share per layer, F3's LLM sink dims and the top dims of each group."""
    return {
        "answer": answer, "answer_ids": row["answer_ids"], "queries": int(res["queries"][0]),
        "norms": res["norms"][0],
        "sinks": {n: np.flatnonzero(m[0]).tolist() for n, m in res["masks"].items()},
        "sink_ratio_per_layer": res["sink_ratio"],
        "attention_per_token_per_layer": res["group_attention"],
        "attention_share_per_layer": res["share"],
        "llm_sink_dims": [int(d) for d in res["sink_dims"] if d >= 0],
        "llm_sinks_per_layer": res["llm_sink"][:, 0].sum(-1),
        "top_dims": {g: np.argsort(-p.mean(0))[:3].tolist() for g, p in res["dim_profile"].items()},
    }


def plot_image(c, image, name: str, res: dict, entry: dict, rule, workdir: Path) -> None:
    """One image's plots, drawn on the image as the model ``c`` (its config) saw it: the F4
    relevance maps of its targets and its sinks by ``rule`` outlined on the patch grid."""
    seen = model_view(c, image)  # the plots draw on the image as the model saw it
    photo, stem, prefix = (np.asarray(to_rgb(image)), seen.box), Path(name).stem, c.vision.prefix_tokens
    plots.relevance_maps(seen.view, {f"{'sink' if t['is_sink'] else 'token'} #{t['index']} "
                                     f"(norm {t['norm']:.0f})": (m, int(tower) - prefix)
                                     for t, m, tower in zip(entry["f4"]["targets"], res["relevance"][0],
                                                            res["f4_tower"][0])},
                         workdir / "plots" / f"{file_stem('relevance', stem)}.png", photo)
    plots.sink_overlay(seen.view,
                       c.patch_values(res["masks"][rule.rule][0], False), c.patch_values(entry["norms"]),
                       c.token_grid, name, workdir / "plots" / f"{file_stem('sinks', stem)}.png", photo)


def analysis_summary(cfg, per_image: dict, skipped: list, empty: list) -> dict:
    """report.json's summary over the images: counts, sinks per image under each rule, F1
    (:func:`f1_summary`), F2's mean attention share per group, F4's object-word hit rates."""
    hits = {"sink": [], "non_sink": []}
    for v in per_image.values():
        for group, rate in v["f4"].get("object_word_in_top_k", {}).items():
            hits[group].append(rate)
    return {"images": len(per_image), "skipped": len(skipped), "empty_answers": len(empty),
            "queries": cfg.analysis.queries,
            "sinks_per_image": sinks_per_image(per_image), **f1_summary(per_image),
            "f2_attention_share": {g: float(_nanmean([v["attention_share_per_layer"][g]
                                                      for v in per_image.values()]))
                                   for g in ("non_sink", "llm_emerged_sink", "propagated_vit_sink")},
            "f4_object_word_in_top_k": {g: float(np.mean(v)) if v else None for g, v in hits.items()}}


def plot_pooled(cfg, rule, per_image: dict, buckets: list, profiles: list, workdir: Path) -> None:
    """The plots over every image: the norm histogram (with ``rule``'s tau), the mean attention
    per norm bucket per layer (``buckets``: [L, K] per image), the dimension profiles."""
    plots.norm_histogram({n: v["norms"] for n, v in per_image.items()}, rule.tau,
                         workdir / "plots" / "norm_histogram.png")
    plots.attention_by_bucket(_nanmean(np.stack(buckets), 0), np.asarray(cfg.bucket_edges),
                              workdir / "plots" / "attention_by_norm_bucket.png")
    plots.dimension_profiles({g: np.mean([p[g] for p in profiles], 0) for g in profiles[0]},
                             workdir / "plots" / "sink_dimensions.png")


def f4_entry(res: dict, norms, sinks: list, tokenizer, word) -> dict:
    """report.json's F4 block for one image: its relevance-map targets and the logit-lens words
    of each target and each sink; with the image's object ``word`` (and a tokenizer) also the
    share of sink / non-sink tokens whose top-k words contain it (``object_word_in_top_k``)."""
    def words(i):
        toks = res["decoded"][0, i].tolist()
        names = tokenizer.convert_ids_to_tokens(toks) if tokenizer is not None else [None] * len(toks)
        return [{"id": t, "token": n, "p": float(p)} for t, n, p in zip(toks, names, res["decoded_p"][0, i])]

    targets = [{"index": int(i), "norm": float(norms[i]), "is_sink": int(i) in sinks,
                "decoded": words(int(i))} for i in res["f4_targets"][0]]
    f4 = {"targets": targets, "decoded_sinks": {int(i): words(int(i)) for i in sinks}}
    if word and tokenizer is not None:
        clean = lambda t: (t or "").lstrip("\u0120\u2581 ").lower()  # noqa: E731  (BPE / SP space marks)
        hit = np.array([any(clean(w["token"]) == word.lower() for w in words(i))
                        for i in range(len(norms))])
        is_sink = np.isin(np.arange(len(norms)), sinks)
        f4["object_word"] = word
        f4["object_word_in_top_k"] = {g: float(hit[m].mean())
                                      for g, m in (("sink", is_sink), ("non_sink", ~is_sink)) if m.any()}
    return f4


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


def _nanmean(x, axis=None):
    """np.nanmean without the all-NaN warning (all-NaN -> NaN)."""
    x = np.asarray(x, np.float64)
    n = np.sum(~np.isnan(x), axis=axis)
    return np.where(n > 0, np.nansum(x, axis=axis) / np.maximum(n, 1), np.nan)
