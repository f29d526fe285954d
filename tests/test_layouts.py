"""Checkpoint layouts of the paper's community read into the same LLaVA: the original LLaVA
codebase (config at the top level, ``model.mm_projector.*``, the CLIP tower in the folder its
``mm_vision_tower`` names) and TinyLLaVA Factory (SigLIP + Phi-2 / Qwen2, ``connector._connector``,
``vision_tower._vision_tower``, Phi-2's head bias). Each is built offline from a tiny random transformers LLaVA by
renaming its tensors as the original code names them; logits are checked against that model."""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import vitsink_jax as vj
from conftest import (IMAGE_TOKEN, VOCAB, assert_close, build, jit_apply, llava_config, phi_config,
                      qwen2_config, siglip_vision_config, t2n)
from test_lvlm import prompt_with_images


def _renamed(hf, names: dict) -> dict:
    """hf's tensors whose names start with a key of ``names``, that prefix replaced by its value."""
    return {new + key[len(old):]: t.contiguous() for key, t in hf.state_dict().items()
            for old, new in names.items() if key.startswith(old)}


def _logits(model, params, hf, rng, n_img: int) -> tuple:
    """(our logits, transformers' logits, ids, pixels) of two one-image prompts; ours mark the
    image with the out-of-vocabulary id these layouts get, transformers' (ids) with its image
    token."""
    ids = np.concatenate([prompt_with_images(rng, 1, n_img) for _ in range(2)])
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    ours = jit_apply(model, {"params": params}, jnp.asarray(np.where(ids == IMAGE_TOKEN, VOCAB, ids)),
                     jnp.asarray(pixels)).logits
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits
    return np.asarray(ours), t2n(ref), ids, pixels


def _llava_codebase(hf, folder, tower_name="clip_tower", projector="mlp2x_gelu"):
    """``hf`` (transformers LLaVA, CLIP + LLaMA) written as liuhaotian/llava-v1.5 writes it:
    the LLaMA config at the top level with mm_* keys, LLM + projector tensors under the
    codebase's names, the CLIP tower saved on its own in ``folder / tower_name``."""
    folder.mkdir()
    hf.model.vision_tower.save_pretrained(str(folder / tower_name))
    names = {"model.language_model.": "model.", "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
             "model.multi_modal_projector.linear_2.": "model.mm_projector.2.", "lm_head.": "lm_head."}
    save_file(_renamed(hf, names), str(folder / "model.safetensors"), metadata={"format": "pt"})
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
    ours, ref, _, _ = _logits(model, params, hf, rng, 16)
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
    with pytest.raises(vj.CheckpointError, match="mm_projector_type .mlp3x_gelu. is not supported"):
        vj.load_pretrained(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.mm_projector.2.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(vj.CheckpointError, match=r"missing tensors \(1\): multi_modal_projector/linear_2/kernel"):
        vj.load_pretrained(bad)


@pytest.mark.parametrize("key,value", [("image_aspect_ratio", "anyres"), ("image_aspect_ratio", "anyres_max_9"),
                                       ("mm_patch_merge_type", "spatial_unpad"), ("mm_use_im_start_end", True)])
def test_llava_codebase_configs_not_run_yet_are_refused_by_name(codebase, tmp_path, key, value):
    """A LLaVA-1.6-style config (any-resolution crops, unpadded patch merging, <im_start> /
    <im_end> tokens around the image) is refused naming the key and value, instead of loading
    as a single-crop LLaVA-1.5."""
    import shutil

    bad = shutil.copytree(codebase[1], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(vj.CheckpointError, match=f"{key} {value!r} is not supported"):
        vj.load_pretrained(bad)


def test_a_padded_checkpoint_is_evaluated_with_padded_images(codebase, tmp_path):
    """An original LLaVA-codebase checkpoint with ``image_aspect_ratio: pad`` pads every image to
    a square with the processor's mean colour before the CLIP processor, as LLaVA's
    ``expand2square`` + CLIPImageProcessor do (the centre crop would lose the borders and change
    the features the sink rule reads); the setting survives save_pretrained."""
    import io

    from PIL import Image
    from skimage import data
    from test_preprocess import llava_expand2square

    from vitsink_jax.data.preprocess import CLIP_MEAN, pixels_from_bytes

    _, folder = codebase
    model, params = vj.load_pretrained(folder)
    assert model.config.image_aspect_ratio == "pad"
    photo = Image.fromarray(data.coffee()).resize((40, 20))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    size = model.config.vision.image_size
    hf = transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                         crop_size={"height": size, "width": size})
    want = hf(llava_expand2square(photo, tuple(int(x * 255) for x in CLIP_MEAN)),
              return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(pixels_from_bytes(model.config, buf.getvalue()), want, atol=1e-5)
    vj.save_pretrained(model, params, tmp_path / "export")
    assert vj.load_pretrained(tmp_path / "export")[0].config.image_aspect_ratio == "pad"


def test_eval_system_auto_is_the_checkpoints_own(codebase, tmp_path):
    """eval.system=auto: vicuna_v1 before the templates of an original-LLaVA-codebase
    checkpoint, TinyLLaVA's for TinyLLaVA, none for a llava-hf one (its chat template's) and the
    embedded default."""
    from conftest import evaluate_config, save
    from vitsink_jax.modes.common import apply_system
    from vitsink_jax.data.prompts import VICUNA_V1

    hf, folder = codebase
    tiny, hub = _tinyllava(hf, tmp_path / "tiny"), save(hf, tmp_path / "hub")  # (config.json decides)
    for i, (ckpt, want) in enumerate(((folder, "vicuna_v1"), (tiny, "tinyllava"), (hub, ""), ("", ""))):
        (tmp_path / f"run{i}").mkdir()
        a = evaluate_config(tmp_path / f"run{i}", ckpt)
        a.eval.system = "auto"
        apply_system(a)
        assert a.eval.system == want
        assert a.analysis.template.startswith(VICUNA_V1) == bool(want)


def _tinyllava(hf, folder, head_bias=None):
    """``hf`` (transformers LLaVA: SigLIP + an LLM, "default" = TinyLLaVA's "patch") written as
    TinyLLaVA Factory writes it: partial text / vision config dicts, its tensor names, and for
    a Phi-2 LLM the PhiForCausalLM head's bias ``head_bias``."""
    folder.mkdir()
    names = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
             "model.vision_tower.": "vision_tower._vision_tower.vision_model.",
             "model.multi_modal_projector.linear_1.": "connector._connector.0.",
             "model.multi_modal_projector.linear_2.": "connector._connector.2."}
    tensors = _renamed(hf, names)
    if hf.config.text_config.tie_word_embeddings:
        tensors.pop("language_model.lm_head.weight")
    if head_bias is not None:
        tensors["language_model.lm_head.bias"] = head_bias
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    text, vision = hf.config.text_config.to_diff_dict(), hf.config.vision_config.to_diff_dict()
    vision["model_name_or_path"] = "google/siglip-so400m-patch14-384"
    cfg = {"model_type": "tinyllava", "architectures": ["TinyLlavaForConditionalGeneration"],
           "llm_model_name_or_path": "microsoft/phi-2", "connector_type": "mlp2x_gelu",
           "text_config": text, "vision_config": vision, "image_token_index": -200,
           "vision_feature_layer": -2, "vision_feature_select_strategy": "patch",
           "hidden_size": text.get("hidden_size", 64), "vocab_size": VOCAB}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("llm", ["phi", "qwen2"])
def test_tinyllava_logits_equal_transformers(tmp_path, rng, llm):
    """SigLIP (second-to-last layer, first patch dropped: 15 of 16) + Phi-2 (head bias) or Qwen2
    (tied embeddings, no lm_head tensor in the file)."""
    text = phi_config() if llm == "phi" else qwen2_config()
    cfg = llava_config(vision=siglip_vision_config(), text=text, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")
    hf = build(transformers.LlavaForConditionalGeneration, cfg)
    bias = torch.randn(VOCAB) * 0.5 if llm == "phi" else None
    model, params = vj.load_pretrained(_tinyllava(hf, tmp_path / "tinyllava", bias))
    c = model.config
    assert c.num_image_tokens == 15 and c.image_token_index == VOCAB
    assert c.lm_head_bias == (llm == "phi")
    ours, ref, ids, pixels = _logits(model, params, hf, rng, 15)
    if bias is not None:
        ref = ref + bias.numpy()
    assert_close(ours, ref, what=f"TinyLLaVA {llm} logits")
    # what TinyLLaVA's "patch" drops is the first patch: sinks map back to tower tokens 1..15
    assert int(c.vit_token_index(np.int32(0))) == 1
    assert c.patch_values(np.arange(15)).tolist() == [0] + list(range(15))
    # the llava-hf export: an <image> row at id 128, which transformers' Llava embeds; its
    # logits over the original vocabulary are ours (Phi-2's head bias aside: Llava has none)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = vj.save_pretrained(model, params, tmp_path / "llava-hf")
    assert [str(w.message) for w in caught if "LM head has a bias" in str(w.message)] == (
        [] if bias is None else [str(caught[0].message)])
    again = vj.load_pretrained(back)[0].config
    assert again.lm_head_bias == c.lm_head_bias and again.num_image_tokens == 15
    assert again.image_token_index == VOCAB and again.text.vocab_size == VOCAB + 1
    exported = transformers.LlavaForConditionalGeneration.from_pretrained(str(back)).eval()
    with torch.no_grad():
        theirs = t2n(exported(input_ids=torch.tensor(np.where(ids == IMAGE_TOKEN, VOCAB, ids)),
                              pixel_values=torch.tensor(pixels)).logits)
    assert_close(theirs[..., :VOCAB] + (0 if bias is None else bias.numpy()), ours,
                 what="transformers on the export")


def test_tinyllava_unknown_connector_is_named(tmp_path):
    hf = build(transformers.LlavaForConditionalGeneration,
               llava_config(vision=siglip_vision_config(), text=qwen2_config()))
    folder = _tinyllava(hf, tmp_path / "t")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "connector_type": "resampler"}))
    with pytest.raises(vj.CheckpointError, match="connector_type 'resampler' is not supported"):
        vj.load_pretrained(folder)


@pytest.mark.parametrize("name", ["tinyllava_0p5b_diysink", "tinyllava_3b_diysink", "llava15_diysink"])
def test_recipes_carry_the_published_hyper_parameters(name):
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(name, root / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pre, ft = mod.get_config(), mod.get_config("finetune")
    assert (pre.stage, pre.batch_size, pre.steps) == ("pretrain", 256, 2181)
    assert (ft.stage, ft.batch_size, ft.steps) == ("finetune", 128, 5198)
    assert pre.optim.warmup_ratio == 0.03
    assert (pre.data.template, pre.data.max_length, pre.data.too_long) == ("auto", 2048, "truncate")
    if name.startswith("llava15"):   # LLaVA-1.5: CLIP-L/336, vicuna_v1, padded images in stage 2
        assert (pre.diysink.rule.rule, pre.diysink.rule.tau, ft.data.image_size) == ("threshold", 100.0, 336)
        assert (ft.data.system, ft.data.image_aspect_ratio, pre.data.image_aspect_ratio) == (
            "vicuna_v1", "pad", "crop")
    else:
        assert pre.diysink.rule.rule == "adaptive" and ft.data.system == "tinyllava"


@pytest.mark.slow
def test_tinyllava_recipe_trains_and_scores_scaled_down(tmp_path):
    """configs/tinyllava_0p5b_diysink.py's finetune recipe, scaled down and nothing else changed
    (bf16, remat, scanned layers, the adaptive sink rule, TinyLLaVA's system prompt) on a tiny
    random TinyLLaVA folder of the same families (SigLIP + Qwen2, its own Qwen2-style
    tokenizer): two updates on the embedded instruction set, then the export scores embedded
    benchmark items with the same system prompt and runs evaluate.py's analyze and interventions
    modes. (~40 s: one training run shared by the evaluation checks of this family.)"""
    import importlib.util
    from pathlib import Path

    from conftest import hf_tokenizer
    from vitsink_jax import eval_lib
    from vitsink_jax.data import instruct, prompts
    from vitsink_jax.data.synthetic import benchmark_corpus, embedded_benchmark
    from vitsink_jax.data.tokenizer import load_tokenizer

    from vitsink_jax import trainer

    root = Path(__file__).resolve().parents[1]
    corpus = benchmark_corpus() + list(prompts.with_system(prompts.TEMPLATES, "tinyllava").values())
    tok = hf_tokenizer("qwen2", tmp_path / "tok", corpus)
    cfg = llava_config(vision=siglip_vision_config(), vision_feature_select_strategy="default",
                       text=qwen2_config(vocab_size=len(tok) + 4), vision_feature_layer=-2)
    folder = _tinyllava(transformers.LlavaForConditionalGeneration(cfg), tmp_path / "tinyllava")
    tok.save_pretrained(str(folder))
    spec = importlib.util.spec_from_file_location("recipe", root / "configs" / "tinyllava_0p5b_diysink.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("finetune")
    c.update(dict(checkpoint=str(folder), steps=2, batch_size=4, checkpoint_every=2))
    c.data.variants, c.data.image_size = 1, 28
    c.optim.loss_group_rows = 2  # the per-device batch scaled down with the batch
    ids, _, question = instruct.tokenize_conversation(
        tok, ["human", "gpt"], ["<image>\nWhat?", "A"],
        prompts.PromptFormat(prompts.CHATS["llava"], prompts.ImageSlots(15, 573)), "tinyllava")
    assert tok.decode(ids[:12]).startswith("A chat between") and not question[:30].any()
    summary = trainer.train(c, tmp_path / "work")
    assert np.isfinite(summary["last_loss"])
    model, params = vj.load_pretrained(tmp_path / "work" / "export")
    assert model.config.diysink.rule.rule == "adaptive" and model.config.num_image_tokens == 15
    assert model.config.image_token_index == 573 < model.config.text.vocab_size  # the <image> row
    records = embedded_benchmark(0, 1, 28)[:4]
    ecfg = type(c)(dict(templates=prompts.with_system(prompts.TEMPLATES, "tinyllava"), batch_size=4,
                        length_bucket=32, mc_format="letter", scoring="loglik", routing="none",
                        max_new_tokens=4))
    preds = eval_lib.predict(model, params, load_tokenizer(tmp_path / "work" / "export"), records, ecfg)
    assert len(preds) == 4 and all(np.isfinite(p["scores"]).all() for p in preds)
    # analyze mode (Findings 1-4) on the export, with TinyLLaVA's system prompt: sink
    # maps over the 4 x 4 patch grid though only 15 patches reach the LLM
    from conftest import evaluate_config
    from vitsink_jax.modes.analyze import run_analyze
    from vitsink_jax.modes.common import apply_system, sink_rule
    from vitsink_jax.modes.interventions import run_interventions

    a = evaluate_config(tmp_path, tmp_path / "work" / "export")
    a.analysis.max_new_tokens, a.eval.system = 4, "tinyllava"
    a.sink.k = 2
    # the default rule per family: SigLIP has no published tau -> adaptive; CLIP -> tau = 100
    assert sink_rule(a, model.config.vision).rule == "adaptive"
    assert sink_rule(a, vj.config_from_hf(llava_config().to_dict()).vision).rule == "threshold"
    apply_system(a)
    report = run_analyze(a, tmp_path / "analysis")
    entry = report["per_image"]["coffee.png"]
    assert len(entry["norms"]) == 15 and len(entry["sinks"]["topk"]) == 2
    assert (tmp_path / "analysis" / "plots" / "sinks_coffee.png").stat().st_size > 1000
    # and its interventions mode (FastV keeping the DIYSink model's own sinks) on the export
    a.benchmark.update(dict(limit=4, image_size=28))
    a.compare.update(dict(specs=("stock", "fastv+sinks:0.5:1"), decode_steps=1))
    res = run_interventions(a, tmp_path / "interventions")["results"]
    assert res["stock"]["visual_tokens_kept"] == 15 and res["fastv+sinks:0.5:1"]["visual_tokens_kept"] == 8
    assert res["fastv+sinks:0.5:1"]["n"] == 4
