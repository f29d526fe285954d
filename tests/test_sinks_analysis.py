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


def test_f4_isolated_decoding_equals_transformers_on_one_token(tmp_path):
    import torch
    import transformers

    import vitsink_jax as vj
    from conftest import assert_close, build, llava_config, save, t2n

    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    feats = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    ours = model.apply({"params": params}, jnp.asarray(feats), method=model.decode_isolated)
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
