"""Checkpoint layouts of the paper's community read into the same LLaVA: the original LLaVA
codebase (config at the top level, ``model.mm_projector.*``, the CLIP tower in the folder its
``mm_vision_tower`` names). Each is built offline from a tiny random transformers LLaVA by
renaming its tensors as the original code names them; logits are checked against that model."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import vitsink_jax as vj
from conftest import IMAGE_TOKEN, VOCAB, assert_close, build, llava_config, t2n
from test_lvlm import prompt_with_images


def _llava_codebase(hf, folder, tower_name="clip_tower", projector="mlp2x_gelu"):
    """``hf`` (transformers LLaVA, CLIP + LLaMA) written as liuhaotian/llava-v1.5 writes it:
    the LLaMA config at the top level with mm_* keys, LLM + projector tensors under the
    codebase's names, the CLIP tower saved on its own in ``folder / tower_name``."""
    folder.mkdir()
    hf.model.vision_tower.save_pretrained(str(folder / tower_name))
    names = {"model.language_model.": "model.", "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
             "model.multi_modal_projector.linear_2.": "model.mm_projector.2.", "lm_head.": "lm_head."}
    tensors = {}
    for key, t in hf.state_dict().items():
        for old, new in names.items():
            if key.startswith(old):
                tensors[new + key[len(old):]] = t.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {**hf.config.text_config.to_dict(), "model_type": "llava",
           "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": tower_name,
           "mm_projector_type": projector, "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "mm_hidden_size": 32, "image_aspect_ratio": "pad",
           "mm_use_im_start_end": False}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def codebase(tmp_path_factory):
    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    return hf, _llava_codebase(hf, tmp_path_factory.mktemp("ckpt") / "llava-v1.5-tiny")


def test_llava_codebase_logits_equal_transformers(codebase, tmp_path, rng):
    hf, folder = codebase
    model, params = vj.load_pretrained(folder)
    c = model.config
    assert c.image_token_index == VOCAB and c.vision_feature_select_strategy == "default"
    ids = np.concatenate([prompt_with_images(rng, 1, 16) for _ in range(2)])
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(np.where(ids == IMAGE_TOKEN, VOCAB, ids)),
                                  jnp.asarray(pixels)).logits)
    with torch.no_grad():
        ref = t2n(hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits)
    assert_close(ours, ref, what="LLaVA-codebase logits")
    # the tower found through an explicit folder gives the same params
    moved = folder.parent / "elsewhere"
    (folder / "clip_tower").rename(moved)
    try:
        with pytest.raises(vj.CheckpointError, match=r"vision tower mm_vision_tower='clip_tower' was "
                           r"not found \(tried clip_tower, .*clip_tower\).*vision_tower=FOLDER"):
            vj.load_pretrained(folder)
        _, again = vj.load_pretrained(folder, vision_tower=moved)
    finally:
        moved.rename(folder / "clip_tower")
    np.testing.assert_array_equal(again["vision_tower"]["embeddings"]["patch_embedding"]["kernel"],
                                  params["vision_tower"]["embeddings"]["patch_embedding"]["kernel"])


def test_llava_codebase_bad_folders_are_named(codebase, tmp_path):
    import shutil

    _, folder = codebase
    bad = shutil.copytree(folder, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "mlp3x_gelu"}))
    with pytest.raises(vj.CheckpointError, match="mm_projector_type 'mlp3x_gelu' is not supported"):
        vj.load_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.mm_projector.2.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(vj.CheckpointError, match=r"missing tensors \(1\): multi_modal_projector/linear_2/kernel"):
        vj.load_pretrained(bad)
