"""Training from a base LLM and a vision tower with a new connector (issue 33 point 1), as the
LLaVA-1.5 and TinyLLaVA trainers start stage 1: the LLM and tower read as released, the
projector drawn as torch.nn.Linear initialises it, and train.py's recipe runs from
``--config.llm`` / ``--config.vision_tower``."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

import vitsink_jax as vj
from conftest import build, hf_tokenizer, jit_apply, qwen2_config, save, siglip_vision_config
from vitsink_jax.convert.layouts import write_fresh_llava
from vitsink_jax.convert.safetensors_io import CheckpointError


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(base Qwen2 LLM folder with its tokenizer, SigLIP tower folder, the HF LLM)."""
    from vitsink_jax.data.prompts import TEMPLATES
    from vitsink_jax.data.synthetic import benchmark_corpus

    root = tmp_path_factory.mktemp("parts")
    tok = hf_tokenizer("qwen2", root / "llm", benchmark_corpus() + list(TEMPLATES.values()))
    llm = build(transformers.Qwen2ForCausalLM, qwen2_config(vocab_size=len(tok)))
    save(llm, root / "llm")
    tok.save_pretrained(str(root / "llm"))
    save(build(transformers.SiglipVisionModel, siglip_vision_config(image_size=56, patch_size=14)),
         root / "tower")
    return root / "llm", root / "tower", llm


def test_a_fresh_llava_reads_the_llm_and_tower_as_released(parts, tmp_path):
    """The LLM's text logits are the released LLM's (transformers'), the tower's weights are
    the tower's, the projector is U(-1/sqrt(in), 1/sqrt(in)) per Linear (weights and biases),
    fixed by the seed; the folder links the LLM's files instead of copying them."""
    llm, tower, hf = parts
    base = write_fresh_llava(llm, tower, tmp_path / "base", seed=3)
    assert (base / "model.safetensors").is_symlink() and (base / "tokenizer.json").is_symlink()
    model, params = vj.load_pretrained(base)
    assert isinstance(model, vj.LlavaForConditionalGeneration)
    ids = np.random.default_rng(0).integers(3, 100, (2, 9)).astype(np.int32)
    ours = jit_apply(model, {"params": params}, ids).logits
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours)[..., :ref.shape[-1]], ref, atol=1e-4)
    _, tower_params = vj.load_pretrained(tower)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params["vision_tower"], tower_params)
    proj = params["multi_modal_projector"]
    for name, n_in in (("linear_1", 32), ("linear_2", 64)):
        for part in ("kernel", "bias"):
            x = np.asarray(proj[name][part])
            assert np.abs(x).max() <= 1 / np.sqrt(n_in) and x.std() > 0.4 / np.sqrt(n_in), (name, part)
    again = vj.load_pretrained(base)[1]["multi_modal_projector"]
    other = vj.load_pretrained(write_fresh_llava(llm, tower, tmp_path / "b4", seed=4))[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, proj)
    assert not np.allclose(other["multi_modal_projector"]["linear_1"]["kernel"], proj["linear_1"]["kernel"])
    # written again (a re-run, another LLM): the folder is replaced whole, no stale link stays
    import shutil
    other_llm = tmp_path / "llm2"
    shutil.copytree(llm, other_llm)
    (other_llm / "extra.txt").write_text("x")
    write_fresh_llava(other_llm, tower, tmp_path / "base", seed=3)
    assert (base / "extra.txt").is_symlink()
    write_fresh_llava(llm, tower, tmp_path / "base", seed=3)
    assert not (base / "extra.txt").exists() and (base / "model.safetensors").resolve().parent == llm.resolve()
    with pytest.raises(CheckpointError, match="no config.json"):
        write_fresh_llava(llm, tmp_path, tmp_path / "bad", seed=0)
    with pytest.raises(CheckpointError, match="not a base LLM"):
        write_fresh_llava(tower, tower, tmp_path / "bad", seed=0)


def test_train_starts_from_a_base_llm_and_tower(parts, tmp_path):
    """train.py from --config.llm / --config.vision_tower: stage 1 in the plain template trains
    the new projector (and only it) for two steps; the export loads in transformers as a LLaVA."""
    from test_train import config
    from vitsink_jax import trainer

    llm, tower, _ = parts
    cfg = config(llm=str(llm), vision_tower=str(tower), steps=2, batch_size=4, **{
        "data.template": "auto", "diysink.enabled": False, "data.image_aspect_ratio": "pad"})
    summary = trainer.train(cfg, tmp_path / "run")
    assert np.isfinite(summary["last_loss"])
    _, before = vj.load_pretrained(tmp_path / "run" / "base")
    _, after = vj.load_pretrained(tmp_path / "run" / "export")
    assert not np.allclose(before["multi_modal_projector"]["linear_1"]["kernel"],
                           after["multi_modal_projector"]["linear_1"]["kernel"])
    flat = lambda p: traverse_util.flatten_dict(p["language_model"])  # noqa: E731
    a, b = flat(before), flat(after)   # the export adds the image id's embedding row: the LLM
    for key, x in a.items():           # is otherwise untouched (frozen in stage 1)
        np.testing.assert_array_equal(np.asarray(b[key])[:x.shape[0]], x, err_msg=str(key))
    assert transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "run" / "export"))
    # trained on padded images: the export says so, and evaluation pads alike
    assert vj.load_pretrained(tmp_path / "run" / "export")[0].config.image_aspect_ratio == "pad"
    with pytest.raises(SystemExit, match="go together"):
        trainer.train(config(llm=str(llm)), tmp_path / "x")
    with pytest.raises(SystemExit, match="leaves no room after the image"):  # a cut in the image
        trainer.train(config(llm=str(llm), vision_tower=str(tower), **{"data.max_length": 4}), tmp_path / "y")
