"""Sink detection on constructed features with planted high-norm tokens and planted activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitsink_jax.sinks import detect
from conftest import jit_apply

N, E = 64, 16
PLANTED = [[3, 17, 40], [9], [0, 5, 22, 50, 63], []]  # different sink counts per image


def planted_features(seed=0, sink_norm=150.0):
    """[4, N, E] features, ordinary norms ~20-40, planted tokens with norm ``sink_norm``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(PLANTED), N, E)).astype(np.float32)
    x *= rng.uniform(20, 40, size=(len(PLANTED), N, 1)) / np.linalg.norm(x, axis=-1, keepdims=True)
    for b, idx in enumerate(PLANTED):
        for j in idx:
            x[b, j] *= sink_norm / np.linalg.norm(x[b, j])
    return jnp.asarray(x)


def expected_mask():
    m = np.zeros((len(PLANTED), N), bool)
    for b, idx in enumerate(PLANTED):
        m[b, idx] = True
    return m


RULES = {"threshold": detect.SinkRule("threshold", tau=100.0),
         "adaptive": detect.SinkRule("adaptive")}


@pytest.mark.parametrize("name", sorted(RULES))
def test_rules_find_planted_sinks_batched_jit_vmap(name):
    rule = RULES[name]
    norms = detect.token_norms(planted_features())
    want = expected_mask()
    np.testing.assert_array_equal(detect.sink_mask(norms, rule), want)
    np.testing.assert_array_equal(jax.jit(lambda n: detect.sink_mask(n, rule))(norms), want)
    per_image = jax.vmap(lambda n: detect.sink_mask(n[None], rule)[0])(norms)
    np.testing.assert_array_equal(per_image, want)


def test_topk_marks_exactly_k_largest():
    norms = detect.token_norms(planted_features())
    mask = jax.jit(lambda n: detect.sink_mask(n, detect.SinkRule("topk", k=3)))(norms)
    assert mask.sum(axis=1).tolist() == [3, 3, 3, 3]
    np.testing.assert_array_equal(np.asarray(mask[0]), expected_mask()[0])  # image 0 has 3 sinks
    assert mask[1, 9] and mask[2].sum() == 3 and set(np.flatnonzero(mask[2])) <= set(PLANTED[2])
    assert not detect.sink_mask_topk(norms, 0).any()
    with pytest.raises(ValueError, match="k=65"):
        detect.sink_mask_topk(norms, 65)


def test_adaptive_sees_no_sinks_in_unimodal_norms_and_adapts_to_scale():
    norms = detect.token_norms(planted_features(sink_norm=30.0))  # planted tokens blend in
    assert not detect.sink_mask(norms, RULES["adaptive"]).any()
    # a small ViT whose sinks are only ~5x larger (below any fixed tau = 100) is still found
    norms = detect.token_norms(planted_features(sink_norm=150.0)) / 10
    np.testing.assert_array_equal(detect.sink_mask(norms, RULES["adaptive"]), expected_mask())
    assert not detect.sink_mask(norms, RULES["threshold"]).any()


def test_bad_rule_and_shapes_are_named():
    with pytest.raises(ValueError, match="unknown sink rule 'median'"):
        detect.SinkRule("median")
    with pytest.raises(AssertionError):
        detect.sink_mask(jnp.ones((2, 3, 4)))


@pytest.mark.slow
def test_sink_dims_found_from_activation_planted_in_a_tiny_llm():
    """Plant a massive activation into a tiny LLaMA's weights; find its dimension from the
    hidden states alone, then flag the tokens it fires with VAR's phi >= 20."""
    import vitsink_jax as vj
    from vitsink_jax.config import TextConfig

    # phi = |h[d]| / RMS(h) is at most sqrt(D): D = 1024 leaves room above VAR's tau = 20
    cfg = TextConfig(model_type="llama", vocab_size=64, hidden_size=1024, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=256)
    model = vj.build_model(cfg)
    params = vj.init_params(model, jax.random.PRNGKey(0))
    dim, token = 37, 11  # token id 11's embedding writes a huge value into hidden dim 37
    emb = params["model"]["embed_tokens"]["embedding"]
    params["model"]["embed_tokens"]["embedding"] = emb.at[token, dim].set(2000.0)
    ids = jnp.asarray([[1, 4, 11, 5, 6, 11, 7, 8], [2, 3, 4, 5, 6, 7, 9, 10]])
    out = jit_apply(model, {"params": params}, ids, output_hidden_states=True)
    hidden = out.hidden_states[1]  # after the first layer
    dims = jax.jit(detect.massive_activation_dims)(hidden)
    assert int(dims[0]) == dim and (np.asarray(dims[1:]) == -1).all()
    mask = jax.jit(detect.llm_sink_mask)(hidden, dims)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(ids == token))
    scores = detect.sink_dim_scores(hidden, dims)
    assert float(scores[0, 2]) > 20 > float(scores[0, 1])


def test_attention_received_on_hand_built_map():
    attn = np.zeros((1, 2, 3, 3), np.float32)
    attn[0, 0] = [[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.2, 0.6]]
    attn[0, 1] = [[1, 0, 0], [1, 0, 0], [1, 0, 0]]
    got = detect.attention_received(jnp.asarray(attn))
    np.testing.assert_allclose(got[0, 0], [1.7 / 3, 0.7 / 3, 0.6 / 3], rtol=1e-6)
    np.testing.assert_allclose(got[0, 1], [1, 0, 0])
    masked = detect.attention_received(jnp.asarray(attn), jnp.asarray([[False, True, True]]))
    np.testing.assert_allclose(masked[0, 0], [0.35, 0.35, 0.3], rtol=1e-6)
