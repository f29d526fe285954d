"""Token reduction before the LLM (FasterVLM, VisionZip, LLaVA-PruMerge, DivPrune): each
selection against numbers worked out by hand on tiny arrays, then on tiny random LVLMs."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitsink_jax as vj
from vitsink_jax.interventions import Interventions, TokenPruning, TokenReduction, parse
from vitsink_jax.interventions import reduction as R
from vitsink_jax.interventions.reduction import kept_positions

from conftest import (IMAGE_TOKEN, build, dinov2_config, gemma3_config, jit_apply, llava_config,
                      qwen2_5_vl_config, save, siglip_vision_config, transformers)


# ------------------------------------------------------------------ selections by hand ---

def test_fastervlm_ranks_by_the_cls_row_averaged_over_heads():
    """CLS rows of two heads over [CLS, v1, v2, v3]: (.1 .5 .1 .3) and (.1 .1 .3 .5), mean
    (.1 .3 .2 .4): the visual tokens score .3 .2 .4, so keeping 2 keeps v1 and v3 (local 0, 2)."""
    w = np.full((1, 2, 4, 4), 0.25, np.float32)
    w[0, 0, 0], w[0, 1, 0] = [0.1, 0.5, 0.1, 0.3], [0.1, 0.1, 0.3, 0.5]
    index = jnp.asarray([[1, 2, 3]])
    scores = R.cls_attention(jnp.asarray(w), index)
    np.testing.assert_allclose(scores, [[0.3, 0.2, 0.4]], rtol=1e-6)
    np.testing.assert_array_equal(R.top_k_in_order(scores, 2), [[0, 2]])
    # without a CLS: mean over heads and the 4 queries, (CLS mean + 3 x .25) / 4
    np.testing.assert_allclose(R.mean_attention_received(jnp.asarray(w), index),
                               [[0.2625, 0.2375, 0.2875]], rtol=1e-6)


def test_attention_layer_is_the_one_that_wrote_the_feature_layer():
    assert R.attention_layer(-2, 3) == 1 and R.attention_layer(-1, 3) == 2 and R.attention_layer(3, 3) == 2
    with pytest.raises(ValueError, match="embeddings"):
        R.attention_layer(0, 3)


def test_prumerge_cls_attention_is_one_full_width_head():
    """q = (1, 0), C = 2: logits k_x / sqrt 2 = ln 1, ln 2, ln 3 -> softmax 1/6, 2/6, 3/6."""
    keys = jnp.asarray([[[0.0, 5.0], [np.sqrt(2) * np.log(2), 0.0], [np.sqrt(2) * np.log(3), -1.0]]])
    got = R.single_head_cls_attention(jnp.asarray([[1.0, 0.0]]), keys, jnp.asarray([[1, 2]]))
    np.testing.assert_allclose(got, [[2 / 6, 3 / 6]], rtol=1e-5)


def test_divprune_greedy_max_min_cosine_distance():
    """Directions 0, 40, 90, 180 degrees (norms differ: only the angle counts). Distances
    1 - cos: d01 .234, d02 1, d03 2, d12 .357, d13 1.766, d23 1. Nearest other: .234 .234 .357
    1 -> first pick t3; distances to {t3}: 2 1.766 1 -> t0; min to {t3, t0}: .234 1 -> t2."""
    a = np.deg2rad([0.0, 40.0, 90.0, 180.0])
    feats = np.stack([np.cos(a), np.sin(a)], -1) * np.array([[1.0], [2.0], [5.0], [0.5]])
    feats = jnp.asarray(feats[None], jnp.float32)
    np.testing.assert_array_equal(R.divprune(feats, 2), [[0, 3]])
    np.testing.assert_array_equal(R.divprune(feats, 3), [[0, 2, 3]])
    np.testing.assert_array_equal(jax.jit(R.divprune, static_argnums=1)(feats, 4), [[0, 1, 2, 3]])


def test_visionzip_dominant_then_contextual_means():
    """Scores (.1 .5 .05 .3 .02 .03): dominant t1, t3. The rest t0 t2 t4 t5 (R = 4, 2
    contextual: step 2) -> targets t0, t4; t2 (.9, .1) and t5 (.8, .2) are nearer t0 (1, 0)
    than t4 (0, 1): contexts (10 + 30 + 60) / 3 and 50."""
    tokens = jnp.asarray([[[10.0], [20.0], [30.0], [40.0], [50.0], [60.0]]])
    scores = jnp.asarray([[0.1, 0.5, 0.05, 0.3, 0.02, 0.03]])
    metric = jnp.asarray([[[1.0, 0.0], [1.0, 1.0], [0.9, 0.1], [1.0, 1.0], [0.0, 1.0], [0.8, 0.2]]])
    out, local = R.visionzip(scores, metric, tokens, 2, 2)
    np.testing.assert_allclose(out[0, :, 0], [20.0, 40.0, 100 / 3, 50.0], rtol=1e-6)
    np.testing.assert_array_equal(local, [[1, 3, -1, -1]])


def test_prumerge_iqr_outliers_neighbours_and_the_pruned_token():
    """Scores .01 ... .07, .5: Q1 = .0275, Q3 = .0625 (linear), bound Q3 + 1.5 IQR = .115: one
    outlier, t7. At most 8 - 1 - floor(.75 x 7) = 2 slots + the appended one. t7's 2 key-
    nearest tokens: t0 (1, .1) and t3 (1, .2) (the others point along (0, 1)) -> 8 + .01 x 1 +
    .04 x 4 = 8.17; the pruned t0..t6 give .01 x 1 + ... + .07 x 7 = 1.40."""
    scores = jnp.asarray([[0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.5]])
    keys = np.tile([0.0, 1.0], (1, 8, 1))
    keys[0, 7], keys[0, 0], keys[0, 3] = [1.0, 0.0], [1.0, 0.1], [1.0, 0.2]
    tokens = jnp.arange(1.0, 9.0)[None, :, None]
    out, local, valid = R.prumerge(scores, jnp.asarray(keys), tokens, 2)
    assert R.prumerge_slots(8) == 2 and out.shape == (1, 3, 1)
    np.testing.assert_array_equal(valid, [[True, False, True]])
    np.testing.assert_array_equal(local, [[7, -1, -1]])
    np.testing.assert_allclose(out[0, [0, 2], 0], [8.17, 1.40], rtol=1e-5)


def test_iqr_slot_bound_is_never_exceeded():
    rng = np.random.default_rng(0)
    for p in (5, 8, 16, 576):
        s = rng.pareto(0.5, size=(200, p))
        q1, q3 = np.percentile(s, [25, 75], axis=1, keepdims=True)
        assert (s > q3 + 1.5 * (q3 - q1)).sum(1).max() <= R.prumerge_slots(p)


def test_specs_and_counts():
    assert parse("fastervlm:0.25")[0] == Interventions(reduce=TokenReduction("fastervlm", 0.25))
    assert parse("visionzip:54:10")[0].reduce == TokenReduction("visionzip", dominant=54, contextual=10)
    assert parse("prumerge")[0].reduce.neighbors == 32 and parse("divprune:0.5")[0].reduce.ratio == 0.5
    assert [parse(s)[0].image_slots(576) for s in ("fastervlm:0.25", "visionzip", "prumerge", "divprune:0.1")] == \
        [144, 64, 145, 58]
    assert parse("stock")[0].image_slots(576) == 576
    assert {m: TokenReduction(m).without_cls for m in ("fastervlm", "visionzip", "prumerge", "divprune")} == {
        "fastervlm": "refused", "visionzip": "mean attention received (VisionZip's SigLIP code)",
        "prumerge": "refused", "divprune": "no [CLS] needed"}
    with pytest.raises(ValueError, match="runs alone"):
        Interventions(prune=TokenPruning(), reduce=TokenReduction("divprune"))
    with pytest.raises(ValueError, match="keeps"):
        TokenReduction("visionzip", dominant=10, contextual=10).slots(16)
    with pytest.raises(ValueError, match="not one of"):
        parse("visionzip:1:2:3")


# ------------------------------------------------------------------- in tiny random LVLMs ---

PIXELS = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 28, 28)), jnp.float32)


def prompt(k: int, image=(IMAGE_TOKEN,), before=(1, 5, 6), after=(7, 8)):
    """Two rows: text, ``k`` image tokens, text."""
    return jnp.asarray(np.array([[*before, *(image * k), *after]] * 2))


@pytest.fixture(scope="module")
def clip_llava(tmp_path_factory):
    """Tiny LLaVA: CLIP 4 x 4 patches + [CLS], 3 layers, feature layer -2 (16 visual tokens)."""
    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    return vj.load_pretrained(save(hf, tmp_path_factory.mktemp("reduce") / "llava"))


def stock_run(model, params):
    return jit_apply(model, {"params": params}, prompt(16), PIXELS, output_attentions=True,
                     output_vision=True)


@pytest.mark.slow  # three un-jitted tower layers on two towers
@pytest.mark.parametrize("tower", ["clip", "dinov2"])
def test_queries_and_keys_from_the_params_give_the_towers_attention(tower, clip_llava, tmp_path):
    model, params = clip_llava if tower == "clip" else vj.load_pretrained(save(
        build(transformers.LlavaForConditionalGeneration, llava_config(vision=dinov2_config())), tmp_path / "d"))
    vout = stock_run(model, params).vision_outputs
    for layer in range(3):
        q, k = model.apply({"params": params}, layer, vout, method=model.tower_qk)
        split = lambda x: np.asarray(x).reshape(2, 17, 4, 8)  # noqa: E731
        w = jax.nn.softmax(np.einsum("nqhd,nkhd->nhqk", split(q), split(k)) / np.sqrt(8), axis=-1)
        np.testing.assert_allclose(w, vout.attentions[layer], atol=1e-5)


def test_fastervlm_in_the_model_keeps_the_cls_top_tokens(clip_llava):
    """By hand on the stock forward: the [CLS] row of layer 1 (wrote hidden_states[-2] of 3
    layers), heads averaged, top 4 of 16 in order, then the projector on those tokens."""
    model, params = clip_llava
    stock = stock_run(model, params)
    cls = np.asarray(stock.vision_outputs.attentions[1])[:, :, 0, 1:].mean(1)
    keep = np.sort(np.argsort(-cls, axis=1, kind="stable")[:, :4], axis=1)
    m = model.clone(interventions=parse("fastervlm:0.25")[0])
    out = jit_apply(m, {"params": params}, prompt(4), PIXELS, output_vision=True)
    np.testing.assert_array_equal(out.vision_token_index, keep + 1)
    np.testing.assert_array_equal(kept_positions(m, params, PIXELS), keep + 1)
    np.testing.assert_allclose(out.image_features, np.take_along_axis(
        np.asarray(stock.image_features), keep[..., None], 1), atol=1e-6)
    assert out.logits.shape == (2, 9, 128) and not np.isnan(np.asarray(out.logits)).any()


def official_divprune(feats, k):
    """DivPrune's loop (its LLaVA code) in numpy on one image's tokens [P, D]."""
    u = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    d = 1.0 - u @ u.T
    s = []
    for i in range(k):
        scores = np.sort(d, axis=0)[1] if i == 0 else d[s].min(0)
        s.append(int(np.argmax(scores)))
    return sorted(s)


def test_divprune_in_the_model_picks_the_official_loops_tokens(clip_llava):
    model, params = clip_llava
    stock = np.asarray(stock_run(model, params).image_features)
    m = model.clone(interventions=parse("divprune:0.25")[0])
    out = jit_apply(m, {"params": params}, prompt(4), PIXELS, output_vision=True)
    want = np.array([official_divprune(f, 4) for f in stock])
    np.testing.assert_array_equal(out.vision_token_index, want + 1)
    np.testing.assert_allclose(out.image_features, np.take_along_axis(stock, want[..., None], 1), atol=1e-6)


@pytest.mark.slow  # un-jitted forwards, ~25 s on 2 shared cores
def test_visionzip_in_the_model_as_its_official_code(clip_llava):
    """The official steps in numpy: dominant = top 4 by the [CLS] row of layer 1 (heads
    summed), the other 12 in order split into targets 0, 6 (step 12 // 2) and the rest, each
    merged into the target of the most similar head-averaged key of layer 1."""
    model, params = clip_llava
    stock = stock_run(model, params)
    vout, feats = stock.vision_outputs, np.asarray(stock.vision_features)
    cls = np.asarray(vout.attentions[1])[:, :, 0, 1:].sum(1)
    _, keys = model.apply({"params": params}, 1, vout, method=model.tower_qk)
    metric = np.asarray(keys)[:, 1:].reshape(2, 16, 4, 8).mean(2)
    m = model.clone(interventions=parse("visionzip:4:2")[0])
    out = m.apply({"params": params}, prompt(6), PIXELS, output_vision=True)
    proj = lambda x: m.apply({"params": params}, jnp.asarray(x), None, method=m.project)  # noqa: E731
    for b in range(2):
        dom = np.sort(np.argsort(-cls[b], kind="stable")[:4])
        rest = np.array([i for i in range(16) if i not in dom])
        targets, others = rest[[0, 6]], np.delete(rest, [0, 6])
        unit = metric[b] / np.linalg.norm(metric[b], axis=1, keepdims=True)
        assign = np.argmax(unit[others] @ unit[targets].T, axis=1)
        ctx = [(feats[b, t] + feats[b, others[assign == j]].sum(0)) / (1 + (assign == j).sum())
               for j, t in enumerate(targets)]
        np.testing.assert_array_equal(out.vision_token_index[b], list(dom + 1) + [-1, -1])
        np.testing.assert_allclose(out.image_features[b], proj(np.concatenate([feats[b, dom], ctx])[None])[0],
                                   atol=1e-5)


@pytest.mark.parametrize("spec", ["fastervlm:1", "divprune:1", "visionzip:16:0"])
def test_keeping_every_token_equals_stock_exactly(clip_llava, spec):
    model, params = clip_llava
    stock = jit_apply(model, {"params": params}, prompt(16), PIXELS).logits
    m = model.clone(interventions=parse(spec)[0])
    np.testing.assert_array_equal(jit_apply(m, {"params": params}, prompt(16), PIXELS).logits, stock)


@pytest.mark.slow  # un-jitted forwards and LLM runs per row, ~45 s
def test_prumerge_unused_slots_equal_a_prompt_without_them(clip_llava):
    """PruMerge's static slots: the unused ones masked with positions closed give the logits of
    the compacted sequence (text, the valid tokens, text) run through the LLM. The layer that
    reads the feature layer gets 8x its query / key weights so that outliers exist."""
    model, params = clip_llava
    params = jax.tree_util.tree_map(lambda x: x, params)
    attn = params["vision_tower"]["encoder"]["layers_2"]["self_attn"]
    for proj in ("q_proj", "k_proj"):
        attn[proj] = {**attn[proj], "kernel": attn[proj]["kernel"] * 8}
    m = model.clone(interventions=parse("prumerge:4")[0])
    feats, positions, valid = jit_apply(m, {"params": params}, PIXELS, method=m.reduced_tokens)
    assert feats.shape[:2] == (2, 5) and valid[:, -1].all() and 1 < valid.sum(1).min() < 5
    out = jit_apply(m, {"params": params}, prompt(5), PIXELS).logits
    lm = lambda e: jit_apply(m, {"params": params}, e, method=lambda mdl, e: mdl.language_model(inputs_embeds=e).logits)  # noqa: E731
    text = jit_apply(m, {"params": params}, prompt(0), method=lambda mdl, i: mdl.language_model.embed(i))
    for b in range(2):
        ok = np.asarray(valid[b])
        embeds = jnp.concatenate([text[b:b + 1, :3], feats[b:b + 1, ok], text[b:b + 1, 3:]], 1)
        want = lm(embeds)[0]
        got = np.asarray(out[b])[np.r_[0:3, 3 + np.flatnonzero(ok), 8:10]]
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.slow  # builds three families, ~80 s on 2 shared cores
def test_towers_without_cls_substitute_or_refuse(tmp_path):
    """SigLIP (no [CLS]): VisionZip ranks by the mean attention received, FasterVLM and
    PruMerge refuse by name; Gemma 3's pooled tokens take DivPrune only; Qwen2.5-VL none."""
    model, params = vj.load_pretrained(save(build(transformers.LlavaForConditionalGeneration,
                                                  llava_config(vision=siglip_vision_config())), tmp_path / "s"))
    n = model.config.num_image_tokens
    m = model.clone(interventions=parse("visionzip:4:2")[0])
    out = jit_apply(m, {"params": params}, prompt(6), PIXELS, output_vision=True)
    assert out.logits.shape[1] == 11 and (np.asarray(out.vision_token_index)[:, 4:] == -1).all()
    for spec in ("fastervlm:0.5", "prumerge"):
        with pytest.raises(ValueError, match=rf"'{spec.split(':')[0]}'.*no \[CLS\] token"):
            model.clone(interventions=parse(spec)[0]).apply({"params": params}, prompt(n), PIXELS)
    g, gp = vj.load_pretrained(save(build(transformers.Gemma3ForConditionalGeneration, gemma3_config()),
                                    tmp_path / "g"))
    marks = dict(before=(1, 5, IMAGE_TOKEN - 2), after=(IMAGE_TOKEN - 1, 7))
    out = g.clone(interventions=parse("divprune:0.5")[0]).apply({"params": gp}, prompt(2, **marks), PIXELS,
                                                                 output_vision=True)
    assert out.image_features.shape[:2] == (2, 2) and not np.isnan(np.asarray(out.logits)).any()
    with pytest.raises(ValueError, match="merges a window of ViT tokens"):
        g.clone(interventions=parse("fastervlm:0.5")[0]).apply({"params": gp}, prompt(2, **marks), PIXELS)
    q, qp = vj.load_pretrained(save(build(transformers.Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config()),
                                    tmp_path / "q"))
    with pytest.raises(ValueError, match="multimodal RoPE"):
        q.clone(interventions=parse("divprune:0.5")[0]).apply(
            {"params": qp}, prompt(2), jnp.zeros((2, 3, 16, 16)))
