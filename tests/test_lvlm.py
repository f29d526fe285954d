"""LLaVA composition against transformers' LlavaForConditionalGeneration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import vitsink_jax as vj
from conftest import (IMAGE_TOKEN, assert_close, build, jit_apply, llava_config,
                      qwen2_config, random_ids, save, siglip_vision_config, t2n)

LLAVA = transformers.LlavaForConditionalGeneration


def prompt_with_images(rng, n_images, tokens_per_image, before=3, after=4):
    """[1, T] ids: text, then n_images blocks of image tokens separated by text, then text."""
    parts = [random_ids(rng, 1, before)]
    for _ in range(n_images):
        parts += [np.full((1, tokens_per_image), IMAGE_TOKEN), random_ids(rng, 1, 2)]
    parts.append(random_ids(rng, 1, after))
    return np.concatenate(parts, axis=1)


def _compare(hf, path, ids, pixels, mask=None):
    model, params = vj.load_pretrained(save(hf, path))
    out = jit_apply(model, {"params": params}, jnp.asarray(ids), jnp.asarray(pixels),
                    attention_mask=None if mask is None else jnp.asarray(mask),
                    output_hidden_states=True, output_vision=True)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                 attention_mask=None if mask is None else torch.tensor(mask),
                 output_hidden_states=True)
    keep = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    assert_close(np.asarray(out.logits)[keep], t2n(ref.logits)[keep], what="logits")
    ref_feats = ref.image_hidden_states  # a list of per-image tensors in transformers 5
    ref_feats = torch.cat(list(ref_feats)) if isinstance(ref_feats, (list, tuple)) else ref_feats
    assert_close(np.asarray(out.image_features).reshape(-1, out.image_features.shape[-1]),
                 t2n(ref_feats).reshape(-1, ref_feats.shape[-1]), what="image features")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(np.asarray(a)[keep], t2n(b)[keep], what=f"hidden_states[{i}]")
    return model, params, out


def test_llava_clip_llama_batch(tmp_path, rng):
    hf = build(LLAVA, llava_config())
    ids = np.concatenate([prompt_with_images(rng, 1, 16) for _ in range(2)])
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    model, _, out = _compare(hf, tmp_path / "llava", ids, pixels)
    assert out.vision_features.shape == (2, 16, 32)  # CLS dropped ("default")
    assert len(out.vision_outputs.hidden_states) == 4


@pytest.mark.slow
def test_llava_left_padded_batch(tmp_path, rng):
    hf = build(LLAVA, llava_config())
    short = prompt_with_images(rng, 1, 16, before=1)
    ids = np.concatenate([np.concatenate([np.zeros((1, 4), int), short], 1),  # left-padded by 4
                          prompt_with_images(rng, 1, 16, before=5)])
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    _compare(hf, tmp_path / "llava_pad", ids, pixels, mask)


@pytest.mark.slow
def test_llava_several_images_feature_layers_full_strategy(tmp_path, rng):
    cfg = llava_config(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full")
    hf = build(LLAVA, cfg)
    ids = prompt_with_images(rng, 3, 17)  # 3 images in one sequence, CLS kept: 17 tokens each
    pixels = rng.standard_normal((3, 3, 28, 28)).astype(np.float32)
    _, _, out = _compare(hf, tmp_path / "llava_multi", ids, pixels)
    assert out.vision_features.shape == (3, 17, 64)  # two layers concatenated


def test_llava_siglip_qwen2(tmp_path, rng):
    cfg = llava_config(vision=siglip_vision_config(vision_use_head=False), text=qwen2_config(),
                       vision_feature_layer=-1, vision_feature_select_strategy="full",
                       multimodal_projector_bias=False)
    hf = build(LLAVA, cfg)
    ids = prompt_with_images(rng, 1, 16)
    pixels = rng.standard_normal((1, 3, 28, 28)).astype(np.float32)
    _, params, _ = _compare(hf, tmp_path / "llava_siglip_qwen2", ids, pixels)
    assert "bias" not in params["multi_modal_projector"]["linear_1"]


def test_image_token_count_mismatch_is_never_silent(tmp_path, rng):
    hf = build(LLAVA, llava_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    ids = jnp.asarray(prompt_with_images(rng, 1, 15))  # one token short
    pixels = jnp.asarray(rng.standard_normal((1, 3, 28, 28)), jnp.float32)
    with pytest.raises(ValueError, match="15 image tokens .* 1 image"):
        model.apply({"params": params}, ids, pixels)
    jitted = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x).logits)
    assert np.isnan(np.asarray(jitted(params, ids, pixels))).all()


def test_linear_projector_round_trip(tmp_path, rng):
    cfg = vj.config_from_hf(llava_config().to_dict())
    cfg = type(cfg)(**{**cfg.__dict__, "projector_type": "linear"})
    model = vj.build_model(cfg)
    params = vj.init_params(model, jax.random.PRNGKey(1))
    assert set(params["multi_modal_projector"]) == {"linear_1"}
    vj.save_pretrained(model, params, tmp_path / "linear")
    model2, params2 = vj.load_pretrained(tmp_path / "linear")
    assert model2.config.projector_type == "linear"
    ids = jnp.asarray(prompt_with_images(rng, 1, 16))
    pixels = jnp.asarray(rng.standard_normal((1, 3, 28, 28)), jnp.float32)
    a = jit_apply(model, {"params": params}, ids, pixels).logits
    b = jit_apply(model2, {"params": params2}, ids, pixels).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_bf16_compute_close_to_fp32(tmp_path, rng):
    hf = build(LLAVA, llava_config())
    path = save(hf, tmp_path / "llava")
    ids = jnp.asarray(prompt_with_images(rng, 1, 16))
    pixels = jnp.asarray(rng.standard_normal((1, 3, 28, 28)), jnp.float32)
    m32, p32 = vj.load_pretrained(path)
    m16, p16 = vj.load_pretrained(path, dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(p16)[0].dtype == jnp.bfloat16
    a = np.asarray(jit_apply(m32, {"params": p32}, ids, pixels).logits)
    out = jit_apply(m16, {"params": p16}, ids, pixels)
    assert out.logits.dtype == jnp.float32
    b = np.asarray(out.logits)
    assert np.max(np.abs(a - b)) <= 3e-2 * max(1.0, np.max(np.abs(a)))
