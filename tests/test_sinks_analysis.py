"""F1-F3 on hand-built attention maps and hidden states with known answers."""

import jax
import jax.numpy as jnp
import numpy as np

from vitsink_jax.sinks import analysis


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
    out = model.apply({"params": params}, ids, pix, output_attentions=True)
    pos = analysis.visual_positions(ids, 63, 16)
    query = jnp.arange(21)[None] >= 18
    vis = analysis.stack_visual_attention(out.attentions, pos, query)
    for layer in range(2):
        a = np.asarray(out.attentions[layer])[0]          # [H, T, T]
        direct = a[:, 18:, 2:18].mean(axis=1)              # [H, P]
        np.testing.assert_allclose(vis[layer, 0], direct, rtol=1e-5, atol=1e-7)
