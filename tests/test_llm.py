"""LLaMA / Qwen2 decoders against transformers (fp32 logits, hidden states, attention weights)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import vitsink_jax as vj
from conftest import (assert_close, build, compare_causal_lm as _compare, jit_apply, llama_config, qwen2_config,
                      random_ids, save, t2n)


def test_llama_gqa(tmp_path, rng):
    hf = build(transformers.LlamaForCausalLM, llama_config())
    _compare(hf, tmp_path / "llama", random_ids(rng, 2, 12))


def test_llama_attention_and_mlp_bias(tmp_path, rng):
    hf = build(transformers.LlamaForCausalLM, llama_config(attention_bias=True, mlp_bias=True,
                                                           num_key_value_heads=4))
    _compare(hf, tmp_path / "llama_bias", random_ids(rng, 2, 9), full=False)


@pytest.mark.slow
def test_qwen2_qkv_bias_tied_embeddings(tmp_path, rng):
    hf = build(transformers.Qwen2ForCausalLM, qwen2_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "qwen2"))
    assert "lm_head" not in params  # tied: the embedding is the head
    assert "bias" in params["model"]["layers_0"]["self_attn"]["q_proj"]
    assert "bias" not in params["model"]["layers_0"]["self_attn"]["o_proj"]
    _compare(hf, tmp_path / "qwen2b", random_ids(rng, 2, 10))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_padded_batches(tmp_path, rng, side, family):
    cls, cfg = ((transformers.LlamaForCausalLM, llama_config()) if family == "llama"
                else (transformers.Qwen2ForCausalLM, qwen2_config()))
    hf = build(cls, cfg)
    ids = random_ids(rng, 3, 10)
    mask = np.ones_like(ids)
    for row, n_pad in enumerate([0, 3, 6]):
        if n_pad:
            sl = slice(0, n_pad) if side == "left" else slice(10 - n_pad, 10)
            mask[row, sl] = 0
            ids[row, sl] = 0
    _compare(hf, tmp_path / f"{family}_{side}", ids, mask)


ROPES = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "longrope": dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                     long_factor=[2.0 + 0.3 * i for i in range(8)],
                     original_max_position_embeddings=16),
}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rope_scaling_types(tmp_path, rng, kind):
    # max_position_embeddings=32 < sequence length 40 so that dynamic / longrope switch regimes
    cfg = llama_config(max_position_embeddings=32, rope_scaling=dict(ROPES[kind], rope_theta=500.0),
                       num_hidden_layers=2)
    hf = build(transformers.LlamaForCausalLM, cfg)
    _compare(hf, tmp_path / kind, random_ids(rng, 1, 40), full=False)


def test_larger_config_4_layers_hidden_512(tmp_path, rng):
    cfg = llama_config(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    hf = build(transformers.LlamaForCausalLM, cfg)
    _compare(hf, tmp_path / "llama512", rng.integers(0, 1000, size=(2, 48)), full=False)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # own lm_head / tied embeddings
def test_bf16_compute_head_returns_unrounded_float32_logits(tmp_path, rng, family):
    """In bf16 compute the head multiplies bf16 operands but outputs float32: the logits are the
    float32 products of the bf16 final hidden state and head, not rounded to bf16 (whose step is
    0.125 near 20, the range here), so the training loss's log-softmax reads them unrounded; the
    loss is close to float32 compute's. Float32 compute stays transformers' (tests above)."""
    from vitsink_jax.train_lib import answer_nll_sum

    cls, cfg = ((transformers.LlamaForCausalLM, llama_config()) if family == "llama"
                else (transformers.Qwen2ForCausalLM, qwen2_config()))
    path = save(build(cls, cfg), tmp_path / family)
    m32, params = vj.load_pretrained(path)
    m16, _ = vj.load_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)  # train.py's
    ids = jnp.asarray(random_ids(rng, 2, 12))
    top = float(np.max(np.abs(jit_apply(m32, {"params": params}, ids).logits)))
    params["model"]["norm"]["scale"] = params["model"]["norm"]["scale"] * (20.0 / top)
    out = jit_apply(m16, {"params": params}, ids, output_hidden_states=True)
    logits = np.asarray(out.logits)
    assert logits.dtype == np.float32 and 15.0 < np.max(np.abs(logits)) < 25.0
    assert np.mean(logits != logits.astype(jnp.bfloat16).astype(np.float32)) > 0.9  # off bf16's grid
    head = params["lm_head"]["kernel"] if family == "llama" else params["model"]["embed_tokens"]["embedding"].T
    h = np.asarray(out.hidden_states[-1])  # the normed final state, bf16
    assert h.dtype == jnp.bfloat16
    want = h.astype(np.float32) @ np.asarray(head.astype(jnp.bfloat16)).astype(np.float32)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    mask = jnp.zeros(ids.shape, bool).at[:, 6:].set(True)
    loss32 = float(answer_nll_sum(jit_apply(m32, {"params": params}, ids).logits, ids, mask))
    loss16 = float(answer_nll_sum(out.logits, ids, mask))
    assert abs(loss16 - loss32) / 12 < 2e-2  # per answer token


def test_inputs_embeds_equals_input_ids(tmp_path, rng):
    hf = build(transformers.LlamaForCausalLM, llama_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "llama"))
    ids = jnp.asarray(random_ids(rng, 1, 7))
    a = jit_apply(model, {"params": params}, ids).logits
    emb = jit_apply(model, {"params": params}, ids, method=model.embed)
    b = jit_apply(model, {"params": params}, inputs_embeds=emb).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="exactly one"):
        model.apply({"params": params}, ids, inputs_embeds=emb)


@pytest.mark.parametrize("impl", ["xla", "explicit"])
def test_attention_impl_switch_equals_transformers(tmp_path, rng, impl):
    """``attention_impl`` "xla" (jax.nn.dot_product_attention, the default) and "explicit" on a
    left-padded batch equal transformers; layers that must return weights run the explicit
    path whatever the switch."""
    hf = build(transformers.LlamaForCausalLM, llama_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "llama"))
    assert model.attention_impl == "xla"
    model = model.clone(attention_impl=impl)
    ids = random_ids(rng, 2, 10)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = t2n(hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits)
    out = jit_apply(model, {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert_close(np.asarray(out.logits)[mask.astype(bool)], ref[mask.astype(bool)], what=f"{impl} logits")
    assert np.isfinite(np.asarray(out.logits)).all()
    weights = jit_apply(model, {"params": params}, jnp.asarray(ids), output_attentions=True).attentions
    assert weights[0].shape == (2, 4, 10, 10)


@pytest.mark.slow
def test_scan_layers_switch_equals_transformers_and_round_trips(tmp_path, rng):
    """``scan_layers=True``: params stacked [L, ...] under model.layers, logits / hidden states /
    attentions of a left-padded batch equal transformers; the scanned params save to the HF
    layout; remat policies give the loop's gradients; a KV cache is refused by name."""
    import jax

    hf = build(transformers.LlamaForCausalLM, llama_config())
    ids = random_ids(rng, 2, 10)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    _compare(hf, tmp_path / "llama", ids, mask, scan_layers=True)
    scanned, params = vj.load_pretrained(tmp_path / "llama", scan_layers=True)
    n = scanned.config.num_hidden_layers
    assert params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == n
    assert not any(k.startswith("layers_") for k in params["model"])
    vj.save_pretrained(scanned, params, tmp_path / "back")
    loop, loop_params = vj.load_pretrained(tmp_path / "back")
    jax.tree_util.tree_map(np.testing.assert_array_equal, loop_params, vj.unstack_layers(params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, vj.stack_layers(loop_params), params)

    x = jnp.asarray(ids)
    np.testing.assert_allclose(scanned.clone(attention_impl="explicit").apply({"params": params}, x).logits,
                               jit_apply(loop, {"params": loop_params}, x).logits, atol=1e-5)
    grad = lambda m, p: jax.grad(lambda p: m.apply({"params": p}, x).logits.std())(p)  # noqa: E731
    ref = grad(loop, loop_params)
    for policy in vj.REMAT_POLICIES:
        got = vj.unstack_layers(grad(scanned.clone(remat=True, remat_policy=policy), params))
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                               got, ref)
    with pytest.raises(ValueError, match="dots_saveable"):
        loop.clone(remat=True, remat_policy="everything").apply({"params": loop_params}, x)
    with pytest.raises(ValueError, match="CausalLM has no option scan_layer"):
        vj.load_pretrained(tmp_path / "llama", scan_layer=True)
    from vitsink_jax.models.llm import init_cache
    with pytest.raises(NotImplementedError, match="scan_layers"):
        scanned.apply({"params": params}, x, cache=init_cache(scanned.config, 2, 16))
