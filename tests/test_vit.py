"""Vision towers against transformers' CLIPVisionModel / SiglipVisionModel (fp32 parity)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import vitsink_jax as vj
from conftest import assert_close, build, clip_vision_config, jit_apply, save, siglip_vision_config, t2n


def _run_both(hf_model, path, pixels):
    model, params = vj.load_pretrained(save(hf_model, path))
    out = jit_apply(model, {"params": params}, jnp.asarray(pixels), output_hidden_states=True,
                    output_attentions=True)
    with torch.no_grad():
        ref = hf_model(torch.tensor(pixels), output_hidden_states=True, output_attentions=True)
    return out, ref


def test_clip_vision_every_hidden_state(tmp_path, rng):
    hf = build(transformers.CLIPVisionModel, clip_vision_config())
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    out, ref = _run_both(hf, tmp_path / "clip", pixels)
    assert_close(out.last_hidden_state, t2n(ref.last_hidden_state), what="last_hidden_state")
    assert_close(out.pooler_output, t2n(ref.pooler_output), what="pooler_output")
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, t2n(b), what=f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions)):
        assert_close(a, t2n(b), what=f"attentions[{i}]")


@pytest.mark.parametrize("use_head", [True, False])
def test_siglip_vision(tmp_path, rng, use_head):
    hf = build(transformers.SiglipVisionModel, siglip_vision_config(vision_use_head=use_head))
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    out, ref = _run_both(hf, tmp_path / "siglip", pixels)
    assert out.hidden_states[0].shape == (2, 16, 32)  # no class token
    assert_close(out.last_hidden_state, t2n(ref.last_hidden_state), what="last_hidden_state")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, t2n(b), what=f"hidden_states[{i}]")
    if use_head:
        assert_close(out.pooler_output, t2n(ref.pooler_output), what="pooler_output (head)")
    else:
        assert out.pooler_output is None


def test_full_clip_checkpoint_loads_vision_half(tmp_path, rng):
    cfg = transformers.CLIPConfig(
        vision_config=clip_vision_config().to_dict(),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=50), projection_dim=16)
    full = build(transformers.CLIPModel, cfg)
    path = save(full, tmp_path / "clip_full")
    model, params = vj.load_pretrained(path)
    assert isinstance(model, vj.VisionTransformer)
    pixels = rng.standard_normal((1, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = full.vision_model(torch.tensor(pixels))
    out = jit_apply(model, {"params": params}, jnp.asarray(pixels))
    assert_close(out.pooler_output, t2n(ref.pooler_output), what="pooler_output")


def test_bad_pixel_shape_names_shape(tmp_path):
    hf = build(transformers.CLIPVisionModel, clip_vision_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "clip"))
    with pytest.raises(ValueError, match=r"pixel_values has shape \(1, 3, 32, 32\)"):
        model.apply({"params": params}, jnp.zeros((1, 3, 32, 32)))
