"""InternVL against transformers: InternViT (LayerNorm / RMSNorm blocks, q/k RMSNorm,
LayerScale), the LVLM (pixel shuffle, LayerNorm + MLP projector, Qwen2) with KV-cache generation,
the scanned layout and round trips transformers loads; the tiles and prompts of its processor;
the sinks read on the ViT tokens before the pixel shuffle and sink-to-the-front inside each tile
against transformers fed the rearranged embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import vitsink_jax as vj
from conftest import (IMAGE_TOKEN, assert_close, build, check_generation_and_scan, internvl_config,
                      internvl_vision_config, jit_apply, qwen2_config, random_ids, save, t2n)
from vitsink_jax.data.padding import left_pad
from vitsink_jax.interventions.registers import register_neurons
from vitsink_jax.sinks.fuse import VisualTokenPolicy

INTERNVL = transformers.InternVLForConditionalGeneration
START, END = IMAGE_TOKEN - 2, IMAGE_TOKEN - 1


@pytest.mark.parametrize("kw", [dict(), dict(use_qk_norm=False, norm_type="rms_norm",
                                             use_mean_pooling=False, attention_bias=True)])
def test_internvit_parity_and_round_trip(tmp_path, rng, kw):
    """Hidden states, attention weights and the last state (LayerNormed without mean pooling)."""
    hf = build(transformers.InternVLVisionModel, internvl_vision_config(**kw))
    model, params = vj.load_pretrained(save(hf, tmp_path / "vit"))
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    out = jit_apply(model, {"params": params}, jnp.asarray(pixels), output_hidden_states=True,
                    output_attentions=True)
    with torch.no_grad():
        ref = hf(torch.tensor(pixels), output_hidden_states=True, output_attentions=True)
    assert_close(out.last_hidden_state, t2n(ref.last_hidden_state), what="last state")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        assert_close(a, t2n(b), what=f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions, strict=True)):
        assert_close(a, t2n(b), what=f"attentions[{i}]")
    vj.save_pretrained(model, params, tmp_path / "back")
    back = transformers.InternVLVisionModel.from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        assert_close(t2n(back(torch.tensor(pixels)).last_hidden_state), t2n(ref.last_hidden_state),
                     what="round trip")


def image_prompt(rng, before: int, tiles: int) -> np.ndarray:
    """An InternVL prompt row: text, <img>, 4 image tokens per tile, </img>, text."""
    return np.concatenate([random_ids(rng, 1, before)[0], [START], [IMAGE_TOKEN] * 4 * tiles, [END],
                           random_ids(rng, 1, 3)[0]])


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    path = tmp_path_factory.mktemp("internvl")
    hf = build(INTERNVL, internvl_config())
    model, params = vj.load_pretrained(save(hf, path / "hf"))
    rng = np.random.default_rng(3)
    ids, mask = left_pad([image_prompt(rng, 2, 2), image_prompt(rng, 5, 2)], 20)
    pixels = rng.standard_normal((4, 3, 28, 28)).astype(np.float32)  # two tiles per image
    return dict(hf=hf, model=model, params=params, ids=ids, mask=mask, pixels=pixels, path=path)


def _hf_forward(d, hf=None, **kw):
    with torch.no_grad():
        return (hf or d["hf"])(input_ids=torch.tensor(d["ids"]), pixel_values=torch.tensor(d["pixels"]),
                               attention_mask=torch.tensor(d["mask"]), **kw)


@pytest.mark.slow
def test_internvl_parity_generation_scan_and_round_trip(internvl):
    """Logits and hidden states over left-padded rows of two tiles each, the projector output,
    greedy generation with the KV cache, the scanned layout, and the export transformers loads
    (the same keys as its own save)."""
    d = internvl
    model, params = d["model"], d["params"]
    out = jit_apply(model, {"params": params}, jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]),
                    attention_mask=jnp.asarray(d["mask"]), output_hidden_states=True, output_vision=True)
    ref = _hf_forward(d, output_hidden_states=True)
    keep = d["mask"].astype(bool)
    assert_close(np.asarray(out.logits)[keep], t2n(ref.logits)[keep], what="logits")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        assert_close(np.asarray(a)[keep], t2n(b)[keep], what=f"hidden_states[{i}]")
    assert_close(out.image_features, t2n(ref.image_outputs.pooler_output), what="projector output")
    check_generation_and_scan(d["hf"], model, params, d, ref.logits, 5)
    back = vj.save_pretrained(model, params, d["path"] / "back")
    assert set(load_file(str(back / "model.safetensors"))) == set(load_file(str(d["path"] / "hf" / "model.safetensors")))
    assert_close(t2n(_hf_forward(d, INTERNVL.from_pretrained(str(back)).eval()).logits)[keep],
                 t2n(ref.logits)[keep], what="transformers on our export")


def test_internvl_sinks_are_read_before_the_pixel_shuffle(internvl):
    """Each visual token carries the largest-norm ViT token of the 2 x 2 window the pixel shuffle
    merges into it; vision_token_index names it in the tower's sequence (CLS first)."""
    d = internvl
    out = jit_apply(d["model"], {"params": d["params"]}, jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]),
                    attention_mask=jnp.asarray(d["mask"]), output_vision=True)
    with torch.no_grad():
        vit = t2n(d["hf"].model.vision_tower(torch.tensor(d["pixels"]), output_hidden_states=True)
                  .hidden_states[-1])[:, 1:]                             # [4, 16, 32]
    windows = np.linalg.norm(vit, axis=-1).reshape(4, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(4, 4, 4)
    local = windows.argmax(-1)
    cell = np.arange(4)
    patch = ((cell // 2) * 2 + local // 2) * 4 + (cell % 2) * 2 + local % 2
    np.testing.assert_array_equal(out.vision_token_index, patch + 1)
    assert_close(out.vision_features, np.take_along_axis(vit, patch[..., None], 1), what="sink features")


@pytest.mark.slow
@pytest.mark.parametrize("order,select", [("front", "all"), ("front", "sinks")])
def test_internvl_sink_to_the_front_inside_each_tile(internvl, order, select):
    """The top-1 visual token of each tile moves to the front of that tile's tokens (or stays
    alone): transformers fed the rearranged projector outputs gives the same logits."""
    d = internvl
    policy = VisualTokenPolicy(order, select, rule=vj.SinkRule("topk", k=1))
    model = d["model"].clone(visual_tokens=policy)
    out = jax.jit(lambda p, i, x, m: model.apply({"params": p}, i, x, attention_mask=m, output_vision=True))(
        d["params"], jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]), jnp.asarray(d["mask"]))
    with torch.no_grad():
        proj = t2n(d["hf"].model.get_image_features(torch.tensor(d["pixels"])).pooler_output)  # [4, 4, D]
    sinks = np.asarray(out.visual_arrangement.sink_mask)
    for row in range(2):
        mask = d["mask"][row].astype(bool)
        ids = d["ids"][row][mask]
        with torch.no_grad():
            emb = t2n(d["hf"].get_input_embeddings()(torch.tensor(ids)))
        tiles = []
        for t in (2 * row, 2 * row + 1):
            idx = np.arange(4)
            first = idx[sinks[t]] if select == "sinks" else np.concatenate([idx[sinks[t]], idx[~sinks[t]]])
            tiles.append(proj[t][first])
        slots = np.flatnonzero(ids == IMAGE_TOKEN)
        seq = np.concatenate([emb[:slots[0]], *tiles, emb[slots[-1] + 1:]])
        with torch.no_grad():
            ref = t2n(d["hf"](inputs_embeds=torch.tensor(seq[None])).logits)[0]
        n = sum(len(t) for t in tiles)
        kept = np.concatenate([np.arange(slots[0]), slots[0] + np.flatnonzero(
            np.concatenate([np.ones(len(t), bool) if select == "all" else np.r_[np.ones(len(t), bool),
                            np.zeros(4 - len(t), bool)] for t in tiles])), np.arange(slots[-1] + 1, len(ids))])
        assert len(kept) == len(seq) and n <= 8
        assert_close(np.asarray(out.logits[row])[np.flatnonzero(mask)[kept]], ref, what=f"row {row}")


def test_internvl_tiles_and_prompt_equal_the_processor(tmp_path):
    """GotOcr2ImageProcessor as InternVL sets it (bicubic, ImageNet mean / std, 448 px tiles here
    28 px, at most 6 tiles, a thumbnail) on photos of three aspect ratios, and the prompt of an
    image of that many tiles in InternVL's ChatML, equal to the ids of InternVLProcessor's
    expansion."""
    from PIL import Image
    from skimage import data

    from conftest import hf_tokenizer
    from vitsink_jax.data.preprocess import preprocess, preprocess_internvl
    from vitsink_jax.data.prompts import TEMPLATES, prompt_format
    from vitsink_jax.data.tokenizer import encode_prompt

    processor_images = transformers.GotOcr2ImageProcessorPil(
        size={"height": 28, "width": 28}, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225], crop_to_patches=True, max_patches=6)
    counts = {}
    for name in ("astronaut", "coffee", "rocket"):
        photo = getattr(data, name)()
        ref = processor_images(images=Image.fromarray(photo), return_tensors="np")
        ours = preprocess_internvl(photo, 28, max_tiles=6)
        counts[name] = len(ours)
        np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5)
        assert len(ours) == ref["num_patches"][0]
    assert counts == {"astronaut": 5, "coffee": 7, "rocket": 7}
    tok = hf_tokenizer("internvl", tmp_path, list(TEMPLATES.values()) + ["What is on the table?"])
    config = vj.config_from_hf(internvl_config(image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>")).to_dict())
    np.testing.assert_allclose(preprocess(config, [data.coffee()]),
                               preprocess_internvl(data.coffee(), 28, max_tiles=1))
    fmt = prompt_format(config, tok)
    text = fmt.chat.render(TEMPLATES["open"].format(question="What is on the table?"))
    # InternVLProcessor.replace_image_token's expansion (the processor itself needs torchvision
    # for its video half), tokenized whole as the processor tokenizes it
    expanded = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 4 * counts["coffee"] + "</img>")
    ids = encode_prompt(tok, text, fmt.image, tiles=[counts["coffee"]])
    np.testing.assert_array_equal(ids, tok(expanded)["input_ids"])
    assert (ids == config.image_token_index).sum() == 4 * 7 and text.startswith("<|im_start|>user\n<image>\n")
    with pytest.raises(ValueError, match="needs a tokenizer with <img> and </img>"):
        prompt_format(config)


@pytest.mark.slow
def test_internvl_checkpoint_scores_and_runs_the_analysis(tmp_path):
    """A tiny random InternVL folder with its own tokenizer (<img>, </img>, <IMG_CONTEXT>,
    ChatML): benchmark items scored in its ChatML, one tile per image, and analyze mode
    (Findings 1-4, the sinks read before the pixel shuffle); test-time register neurons found on
    InternViT; a DIYSink InternVL with equal projectors is the stock model's sink-to-the-front;
    train.py's DIYSink recipe trains its two projectors for two steps. (~30 s: the analysis and
    the training step compile their own programs.)"""
    from conftest import check_shared_prefix_scoring, evaluate_config, hf_tokenizer, train_diysink_briefly
    from vitsink_jax.config import DIYSinkConfig
    from vitsink_jax.data import prompts
    from vitsink_jax.data.synthetic import benchmark_corpus, embedded_benchmark
    from vitsink_jax.diysink import to_diysink

    from vitsink_jax.modes.analyze import run_analyze

    tok = hf_tokenizer("internvl", tmp_path / "tok", benchmark_corpus() + list(prompts.TEMPLATES.values()))
    cfg = internvl_config(qwen2_config(vocab_size=len(tok)), image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    folder = save(build(INTERNVL, cfg), tmp_path / "internvl")
    tok.save_pretrained(str(folder))
    model, params = vj.load_pretrained(folder)
    ecfg = evaluate_config(tmp_path, folder)
    ecfg.eval.update(dict(batch_size=4, length_bucket=32))
    scores = check_shared_prefix_scoring(model, params, tok, embedded_benchmark(0, 1, 28)[:4], ecfg.eval)
    assert len(scores) == 4 and np.isfinite(scores).all()
    ecfg.analysis.max_new_tokens, ecfg.sink.k = 4, 2
    entry = run_analyze(ecfg, tmp_path / "analysis")["per_image"]["coffee.png"]
    assert len(entry["norms"]) == 4 and len(entry["sinks"]["topk"]) == 2
    rule = vj.SinkRule("topk", k=1)
    diy, diy_params = to_diysink(model, params, DIYSinkConfig(rule))
    pixels = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 28, 28)), jnp.float32)
    ids = jnp.asarray(np.r_[[5, 6, 7], [cfg.image_token_id] * 4, [8]][None])
    front = model.clone(visual_tokens=VisualTokenPolicy("front", rule=rule))
    np.testing.assert_allclose(jit_apply(diy, {"params": diy_params}, ids, pixels).logits,
                               jit_apply(front, {"params": params}, ids, pixels).logits, atol=1e-5)
    scratch, scratch_params = to_diysink(model, params, DIYSinkConfig(rule), init="scratch")
    assert scratch_params["multi_modal_projector_sink"]["linear_1"]["kernel"].shape == (128, 64)  # 4 x 32 wide
    assert np.isfinite(jit_apply(scratch, {"params": scratch_params}, ids, pixels).logits).all()
    neurons = register_neurons(model, params, pixels, rule, 2)
    assert len(neurons) == 2 and all(0 <= layer < 3 for layer, _, _ in neurons)
    train_diysink_briefly(folder, tmp_path / "train")
