"""DINOv2 and DINOv2-with-registers towers against transformers (fp32 parity), alone, at other
image sizes (interpolated position embeddings) and inside a LLaVA checkpoint."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import vitsink_jax as vj
from conftest import assert_close, build, dinov2_config, jit_apply, llava_config, save, t2n
from test_lvlm import prompt_with_images
from vitsink_jax.models.dinov2 import resize_matrix

MODELS = {0: transformers.Dinov2Model, 4: transformers.Dinov2WithRegistersModel}


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", [(28, 28), (42, 35), (14, 21)])  # native, up- and down-sampled grid
def test_dinov2_tower(tmp_path, rng, registers, size):
    hf = build(MODELS[registers], dinov2_config(registers))
    model, params = vj.load_pretrained(save(hf, tmp_path / "dino"))
    pixels = rng.standard_normal((2, 3) + size).astype(np.float32)
    out = jit_apply(model, {"params": params}, jnp.asarray(pixels), output_hidden_states=True,
                    output_attentions=True)
    with torch.no_grad():
        ref = hf(torch.tensor(pixels), output_hidden_states=True, output_attentions=True)
    n = 1 + registers + (size[0] // 7) * (size[1] // 7)
    assert out.last_hidden_state.shape == (2, n, 32)
    assert_close(out.last_hidden_state, t2n(ref.last_hidden_state), what="last_hidden_state")
    assert_close(out.pooler_output, t2n(ref.pooler_output), what="pooler_output")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, t2n(b), what=f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions)):
        assert_close(a, t2n(b), what=f"attentions[{i}]")


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(4, 7), (7, 4), (5, 5), (6, 2)])
def test_resize_matrix_equals_torch_bicubic(antialias, n_in, n_out):
    x = np.random.default_rng(0).standard_normal((1, 1, n_in, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.tensor(x), size=(n_out, 3), mode="bicubic",
                                          align_corners=False, antialias=antialias).numpy()
    ours = np.einsum("oi,ij->oj", resize_matrix(n_in, n_out, antialias), x[0, 0])
    np.testing.assert_allclose(ours, ref[0, 0], atol=1e-5)


@pytest.mark.parametrize("registers", [0, 4])
def test_llava_with_dinov2_tower(tmp_path, rng, registers):
    hf = build(transformers.LlavaForConditionalGeneration, llava_config(vision=dinov2_config(registers)))
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    assert model.config.num_image_tokens == 16  # registers never reach the projector
    ids = np.concatenate([prompt_with_images(rng, 1, 16) for _ in range(2)])
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    out = jit_apply(model, {"params": params}, jnp.asarray(ids), jnp.asarray(pixels), output_vision=True)
    assert out.vision_features.shape == (2, 16, 32)
    if registers == 0:  # transformers' LLaVA keeps registers; compare the plain tower end to end
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits
        assert_close(out.logits, t2n(ref), what="logits")
    else:  # same tower, registers removed before the projector
        with torch.no_grad():
            h = hf.model.vision_tower(torch.tensor(pixels), output_hidden_states=True).hidden_states
        patches = t2n(h[hf.config.vision_feature_layer])[:, 1 + registers:]
        assert_close(out.vision_features, patches, what="projector input")
    back = vj.save_pretrained(model, params, tmp_path / "again")
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(str(back))
    assert type(reloaded.model.vision_tower).__name__ == type(hf.model.vision_tower).__name__


@pytest.mark.slow
def test_llava_dinov2_at_another_input_size(tmp_path, rng):
    """A LLaVA whose DINOv2 tower runs at 42 px (grid 6) while its position grid is 4 x 4."""
    import dataclasses

    hf = build(transformers.LlavaForConditionalGeneration, llava_config(vision=dinov2_config()))
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    config = dataclasses.replace(model.config, image_size=42)
    assert config.num_image_tokens == 36 and config.grid_size == 6
    model, params = vj.load_pretrained(vj.save_pretrained(vj.build_model(config), params, tmp_path / "at42"))
    assert model.config.image_size == 42
    ids = np.concatenate([prompt_with_images(rng, 1, 36) for _ in range(2)])
    pixels = rng.standard_normal((2, 3, 42, 42)).astype(np.float32)
    out = jit_apply(model, {"params": params}, jnp.asarray(ids), jnp.asarray(pixels))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits
    assert_close(out.logits, t2n(ref), what="logits at 42 px")
    with pytest.raises(ValueError, match="only DINOv2 towers interpolate"):
        dataclasses.replace(vj.load_pretrained(save(build(transformers.LlavaForConditionalGeneration,
                                                          llava_config()), tmp_path / "clip"))[0].config,
                            image_size=42)
