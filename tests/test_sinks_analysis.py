"""F1-F3 on hand-built attention maps and hidden states with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitsink_jax.sinks import analysis
from conftest import jit_apply


def hand_built():
    """One sequence: [text, v0, v1, v2, v3, text, text]; visual tokens at positions 1-4.

    Both text queries (5, 6) pay 0.4 to v1 (the sink), 0.1 to each other visual token, the rest
    to token 0. Two identical heads; two identical layers.
    """
    t = 7
    attn = np.zeros((1, 2, t, t), np.float32)
    attn[0, :, np.arange(t), 0] = 1.0  # every query attends to token 0 by default
    for q in (5, 6):
        attn[0, :, q] = 0
        attn[0, :, q, 1:5] = [0.1, 0.4, 0.1, 0.1]
        attn[0, :, q, 0] = 0.3
    vis_pos = jnp.asarray([[1, 2, 3, 4]])
    query = jnp.asarray([[False] * 5 + [True, True]])
    return [jnp.asarray(attn), jnp.asarray(attn)], vis_pos, query


def test_visual_positions():
    ids = jnp.asarray([[5, 9, 9, 9, 9, 6, 7], [9, 9, 9, 9, 1, 2, 3]])
    np.testing.assert_array_equal(analysis.visual_positions(ids, 9, 4), [[1, 2, 3, 4], [0, 1, 2, 3]])


def test_f1_ratio_and_buckets_on_known_map():
    attns, vis_pos, query = hand_built()
    vis = jax.jit(analysis.stack_visual_attention)(attns, vis_pos, query)
    assert vis.shape == (2, 1, 2, 4)
    np.testing.assert_allclose(vis[0, 0, 0], [0.1, 0.4, 0.1, 0.1], rtol=1e-6)
    sink = jnp.asarray([[False, True, False, False]])
    np.testing.assert_allclose(analysis.sink_attention_ratio(vis, sink), [4.0, 4.0], rtol=1e-6)
    norms = jnp.asarray([[20.0, 150.0, 30.0, 55.0]])
    mean, count = analysis.attention_by_norm_bucket(vis, norms, jnp.asarray([0.0, 50.0, 100.0, 200.0]))
    np.testing.assert_array_equal(count, [2, 1, 1])
    np.testing.assert_allclose(mean[0, 0], [0.1, 0.1, 0.4], rtol=1e-6)
    empty, _ = analysis.attention_by_norm_bucket(vis, norms, jnp.asarray([0.0, 60.0, 70.0, 200.0]))
    assert np.isnan(empty[0, 0, 1])


def test_f2_group_shares():
    attns, vis_pos, query = hand_built()
    vis = analysis.stack_visual_attention(attns, vis_pos, query)
    vit = jnp.asarray([[False, True, False, False]])
    llm = jnp.asarray([[[False, True, False, True]], [[False, False, False, False]]])  # [L, B, P]
    groups = analysis.token_groups(vit, llm)
    share = analysis.attention_share_by_group(vis, groups)
    np.testing.assert_allclose(share["propagated_vit_sink"], [0.4, 0.4], rtol=1e-6)
    np.testing.assert_allclose(share["llm_emerged_sink"][0], 0.1, rtol=1e-6)
    assert np.isnan(share["llm_emerged_sink"][1])  # no emerged sink in layer 1
    np.testing.assert_allclose(share["non_sink"], [0.1, 0.1], rtol=1e-6)


def test_f3_dimension_profile_finds_planted_dims():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 1, 6, 32)).astype(np.float32)
    hidden[:, 0, 1, 7] = 300.0   # a "propagated ViT sink" token fires dim 7
    hidden[:, 0, 4, 21] = 300.0  # an "LLM-emerged sink" token fires dim 21
    vit_tokens = jnp.asarray([[False, True, False, False, False, False]])
    llm_tokens = jnp.asarray([[False, False, False, False, True, False]])
    prof_vit = analysis.sink_dimension_profile(jnp.asarray(hidden), vit_tokens)
    prof_llm = analysis.sink_dimension_profile(jnp.asarray(hidden), llm_tokens)
    assert analysis.top_dims(prof_vit, 1).ravel().tolist() == [7, 7]
    assert analysis.top_dims(prof_llm, 1).ravel().tolist() == [21, 21]


@pytest.mark.slow
def test_visual_attention_on_a_real_model_matches_a_direct_loop(tmp_path):
    import vitsink_jax as vj
    from vitsink_jax.config import LlavaConfig, TextConfig, VisionConfig

    cfg = LlavaConfig(
        vision=VisionConfig("clip_vision_model", 32, 64, 2, 4, image_size=28, patch_size=7),
        text=TextConfig("llama", 64, 32, 64, 2, 4, 2, 8), image_token_index=63)
    model = vj.build_model(cfg)
    params = vj.init_params(model, jax.random.PRNGKey(0))
    ids = jnp.asarray([[1, 2] + [63] * 16 + [3, 4, 5]])
    pix = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 28, 28))
    out = jit_apply(model, {"params": params}, ids, pix, output_attentions=True)
    pos = analysis.visual_positions(ids, 63, 16)
    query = jnp.arange(21)[None] >= 18
    vis = analysis.stack_visual_attention(out.attentions, pos, query)
    for layer in range(2):
        a = np.asarray(out.attentions[layer])[0]          # [H, T, T]
        direct = a[:, 18:, 2:18].mean(axis=1)              # [H, P]
        np.testing.assert_allclose(vis[layer, 0], direct, rtol=1e-5, atol=1e-7)


def test_f4_relevance_map_on_known_attention():
    # 1 CLS + 2x2 patches; every patch query gives its attention to target patch 3 in proportion
    # to its own index, the target itself puts 0.9 on itself (must be ignored)
    attn = np.zeros((1, 1, 5, 5), np.float32)
    for q in range(1, 5):
        attn[0, 0, q, 4] = 0.1 * q
    attn[0, 0, 4, 4] = 0.9
    maps = jax.jit(analysis.relevance_maps, static_argnums=(2, 3))(
        jnp.asarray(attn), jnp.asarray([[4, 1]]), 2, 1)
    assert maps.shape == (1, 1, 2, 2, 2)
    np.testing.assert_allclose(maps[0, 0, 0], [[0.1, 0.2], [0.3, 0.0]], atol=1e-7)
    np.testing.assert_allclose(maps[0, 0, 1], 0.0)
    assert analysis.vit_attention_layer(-2) == -2 and analysis.vit_attention_layer(3) == 2


@pytest.mark.slow
def test_f4_isolated_decoding_equals_transformers_on_one_token(tmp_path):
    import torch
    import transformers

    import vitsink_jax as vj
    from conftest import assert_close, build, llava_config, save, t2n

    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    feats = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    ours = jit_apply(model, {"params": params}, jnp.asarray(feats), method=model.decode_isolated)
    lm = hf.model.language_model
    with torch.no_grad():
        for i, pos in ((0, 0), (1, 37)):  # a lone token's logits do not depend on its position
            for j in range(3):
                x = torch.tensor(feats[i, j][None, None])
                h = lm(inputs_embeds=x, position_ids=torch.tensor([[pos]])).last_hidden_state
                assert_close(ours[i, j], t2n(hf.lm_head(h))[0, 0], what=f"token {i},{j}")
    ids, probs = analysis.top_decoded(ours, 3)
    np.testing.assert_array_equal(ids, np.argsort(-np.asarray(ours), -1)[..., :3])
    assert probs.shape == (2, 3, 3) and np.all(np.diff(probs, axis=-1) <= 0)


def planted(order="front", select="all"):
    """One row [text, 4 visual slots, 2 answer tokens]; stock token 2 is the planted ViT sink
    (norm 150, the others 20). The visual tokens are rearranged by ``order`` / ``select`` (as a
    DIYSink model or sink-to-the-front does) and the answer tokens pay 0.4 to the *slot* that
    holds the sink, 0.1 to every other visual slot, 0.3 to token 0."""
    from vitsink_jax.models.outputs import LlavaOutput, VisualArrangement
    from vitsink_jax.sinks.fuse import arrange_visual_tokens

    norms = np.array([[20.0, 20.0, 150.0, 20.0]], np.float32)
    feats = np.zeros((1, 4, 8), np.float32)
    feats[..., 0] = norms
    sink = jnp.asarray(norms >= 100)
    perm, kept = arrange_visual_tokens(sink, order, select)
    slot_of_sink = int(np.flatnonzero(np.asarray(perm[0]) == 2)[0])
    t = 7
    attn = np.zeros((1, 2, t, t), np.float32)
    attn[0, :, np.arange(t), 0] = 1.0
    for q in (5, 6):
        attn[0, :, q] = 0.0
        attn[0, :, q, 1:5] = 0.1
        attn[0, :, q, 1 + slot_of_sink] = 0.4
        attn[0, :, q, 0] = 0.3
    hidden = tuple(jnp.asarray(np.random.default_rng(i).standard_normal((1, t, 16)), jnp.float32)
                   for i in range(3))
    out = LlavaOutput(logits=jnp.zeros((1, t, 4)), vision_features=jnp.asarray(feats),
                      attentions=(jnp.asarray(attn),) * 2, hidden_states=hidden,
                      visual_arrangement=VisualArrangement(sink, perm, kept))
    ids = jnp.asarray([[1, 9, 9, 9, 9, 5, 6]])
    return out, ids, perm


def run_planted(out, ids, **kw):
    from vitsink_jax.sinks.detect import SinkRule

    query = analysis.answer_queries(jnp.asarray([5]), jnp.asarray([2]), 7)
    return analysis.analyze_forward(out, ids, 9, SinkRule(tau=100.0),
                                    jnp.asarray([0.0, 100.0, 1000.0]), query, **kw)


@pytest.mark.slow
def test_analysis_reads_a_rearranged_sequence_in_stock_order():
    """Sink-to-the-front / DIYSink put the sink in slot 0; its attention must still be counted
    for stock token 2 (and the F1 ratio be 4, as in the stock order)."""
    for order in ("none", "front", "end"):
        out, ids, perm = planted(order)
        res = jax.jit(run_planted)(out, ids)
        assert res["vit_sink"][0].tolist() == [False, False, True, False]
        np.testing.assert_allclose(res["vis_attn"][0, 0, 0], [0.1, 0.1, 0.4, 0.1], rtol=1e-6)
        np.testing.assert_allclose(res["sink_ratio"], [4.0, 4.0], rtol=1e-6)
        np.testing.assert_allclose(res["bucket_mean"][0, 0], [0.1, 0.4], rtol=1e-6)
    assert np.asarray(perm)[0].tolist() == [0, 1, 3, 2]  # "end": the sink really moved
    # tokens a selection dropped are in no group: sink-only input leaves no non-sink token
    out, ids, _ = planted("front", "sinks")
    res = run_planted(out, ids)
    assert res["valid"][0].tolist() == [False, False, True, False]
    assert np.isnan(res["sink_ratio"]).all() and res["bucket_count"].tolist() == [0, 1]


@pytest.mark.slow
def test_analysis_masks_padding_and_refuses_missing_image_tokens():
    out, ids, _ = planted("none")
    # a padded query position (mask 0) paying all its attention to token 0 must not count
    attn = np.array(out.attentions[0])
    attn[0, :, 6] = 0.0
    attn[0, :, 6, 1] = 1.0
    out = out.replace(attentions=(jnp.asarray(attn),) * 2)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 0]])
    res = run_planted(out, ids, attention_mask=mask)
    np.testing.assert_allclose(res["vis_attn"][0, 0, 0], [0.1, 0.1, 0.4, 0.1], rtol=1e-6)
    assert int(res["queries"][0]) == 1
    unmasked = run_planted(out, ids)
    assert float(unmasked["vis_attn"][0, 0, 0, 0]) > 0.5
    # a row without its image tokens: an error outside jit, NaN under jit (never a number)
    short = jnp.asarray([[1, 9, 9, 9, 4, 5, 6]])
    with pytest.raises(ValueError, match="row 0 holds 3 image tokens"):
        analysis.visual_positions(short, 9, 4)
    res = jax.jit(run_planted)(out, short)
    assert np.isnan(res["vis_attn"]).all() and np.isnan(res["sink_ratio"]).all()


def test_an_empty_answer_gives_no_attention_data():
    """A row whose answer is empty (EOS first: no query) is in no group: its F1 means are NaN,
    not 0.0, and beside an answered row the batch's means are the answered row's alone."""
    from vitsink_jax.sinks.detect import SinkRule

    out, ids, _ = planted("none")
    two = out.replace(vision_features=jnp.concatenate([out.vision_features] * 2),
                      attentions=tuple(jnp.concatenate([a] * 2) for a in out.attentions),
                      hidden_states=tuple(jnp.concatenate([h] * 2) for h in out.hidden_states),
                      visual_arrangement=None)
    edges = jnp.asarray([0.0, 100.0, 1000.0])
    answered = analysis.answer_queries(jnp.asarray([5, 5]), jnp.asarray([2, 0]), 7)
    res = jax.jit(analysis.analyze_forward, static_argnums=(2, 3))(
        two, jnp.concatenate([ids] * 2), 9, SinkRule(tau=100.0), edges, answered)
    np.testing.assert_allclose(res["group_attention"]["sink"], [0.4, 0.4], rtol=1e-6)
    np.testing.assert_allclose(res["group_attention"]["non_sink"], [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(res["bucket_mean"][0, 0], [0.1, 0.4], rtol=1e-6)
    assert res["queries"].tolist() == [2, 0] and not res["valid"][1].any()
    one = analysis.analyze_forward(out.replace(visual_arrangement=None), ids, 9, SinkRule(tau=100.0), edges,
                                   analysis.answer_queries(jnp.asarray([5]), jnp.asarray([0]), 7))
    assert np.isnan(one["group_attention"]["sink"]).all() and np.isnan(one["group_attention"]["non_sink"]).all()


def test_llm_sink_dims_are_found_on_text_tokens_only():
    """A visual token with a massive activation (lit by a ViT sink) does not make its dimension
    an LLM sink dimension; the BOS token's massive dimension is found."""
    out, ids, _ = planted("none")
    hidden = [np.array(h) for h in out.hidden_states]
    for h in hidden:
        h[0, 0, 3] = 1e5   # BOS: dimension 3
        h[0, 3, 11] = 1e6  # visual token 2 (the ViT sink): dimension 11
    res = run_planted(out.replace(hidden_states=tuple(jnp.asarray(h) for h in hidden)), ids)
    assert [int(d) for d in res["sink_dims"] if d >= 0] == [3]


@pytest.mark.slow
def test_cls_token_is_never_a_sink_and_keeps_its_slot_under_full_strategy():
    import vitsink_jax as vj
    from vitsink_jax.config import LlavaConfig, TextConfig, VisionConfig
    from vitsink_jax.sinks.detect import SinkRule, sink_mask
    from vitsink_jax.sinks.fuse import arrange_visual_tokens

    norms = jnp.asarray([[500.0, 10.0, 300.0, 20.0, 200.0]])  # token 0: a CLS with the top norm
    assert sink_mask(norms, SinkRule("topk", k=2), prefix=1)[0].tolist() == [False, False, True, False, True]
    assert sink_mask(norms, SinkRule("adaptive", max_fraction=0.5), prefix=1)[0].tolist() == [False, False, True, False, True]
    perm, kept = arrange_visual_tokens(jnp.asarray([[False, False, True, False, True]]), "front", "sinks", 1)
    assert perm[0].tolist() == [0, 2, 4, 1, 3] and kept[0].tolist() == [True, True, True, False, False]

    cfg = LlavaConfig(
        vision=VisionConfig("clip_vision_model", 32, 64, 2, 4, image_size=28, patch_size=7),
        text=TextConfig("llama", 64, 32, 64, 2, 4, 2, 8), image_token_index=63,
        vision_feature_select_strategy="full")
    feats = np.ones((1, 17, 32), np.float32)
    feats[0, 0] *= 50.0                      # CLS norm ~283
    feats[0, 5] *= 30.0                      # a patch with norm ~170
    rule = SinkRule("topk", k=1)
    model = vj.build_model(cfg).clone(visual_tokens=vj.VisualTokenPolicy("front", rule=rule))
    assert np.flatnonzero(model.visual_sinks(jnp.asarray(feats))[0]).tolist() == [5]
    with_cls = model.clone(visual_tokens=vj.VisualTokenPolicy("front", rule=SinkRule("topk", k=1, include_cls=True)))
    assert np.flatnonzero(with_cls.visual_sinks(jnp.asarray(feats))[0]).tolist() == [0]
    # a real forward: whatever the sinks, CLS stays in slot 0 of the rearranged sequence
    params = vj.init_params(model, jax.random.PRNGKey(0))
    ids = jnp.asarray([[1, 2] + [63] * 17 + [3]])
    pix = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 28, 28))
    out = jit_apply(model, {"params": params}, ids, pix, output_vision=True)
    arr = out.visual_arrangement
    assert int(arr.permutation[0, 0]) == 0 and not bool(arr.sink_mask[0, 0])
    assert int(arr.permutation[0, 1]) == int(np.flatnonzero(arr.sink_mask[0])[0])


def test_f1_heat_map_ticks_whole_layers(tmp_path, monkeypatch):
    """The F1 heat map's layer axis has a tick per whole layer (not -0.5 ... 1.5 for two
    layers), at most 16 of them for a deep model."""
    from vitsink_jax import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(list(fig.axes[0].get_yticks())))
    for layers in (2, 32):
        plots.attention_by_bucket(np.ones((layers, 3)), np.array([0.0, 1.0, 2.0, 3.0]), tmp_path / "f1.png")
    assert seen == [[0, 1], list(range(0, 32, 2))]
