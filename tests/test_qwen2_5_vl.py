"""Qwen2.5-VL against transformers: the windowed ViT (2-D RoPE, partial windows at the grid's
edge, a full-attention block), the patch merger, the LLM's multimodal RoPE over left-padded rows
with KV-cache generation, the scanned layout and the export transformers loads; the processor's
dynamic resolution; the sinks read on the ViT tokens before the merger and sink-to-the-front /
token selection with the 3-D position ids against transformers fed the rearranged embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import vitsink_jax as vj
from conftest import (IMAGE_TOKEN, assert_close, build, check_diysink, check_generation_and_scan, jit_apply, qwen2_5_vl_config,
                      qwen_hf_inputs, random_ids, save, t2n)
from vitsink_jax.data.padding import left_pad
from vitsink_jax.generate import generate
from vitsink_jax.interventions import Interventions, TokenPruning
from vitsink_jax.models.qwen2_5_vl import mrope_positions
from vitsink_jax.sinks.fuse import VisualTokenPolicy

QWEN = transformers.Qwen2_5_VLForConditionalGeneration
START, END = IMAGE_TOKEN - 2, IMAGE_TOKEN - 1
H, W = 24, 40          # 6 x 10 patches -> 3 x 5 visual tokens; windows of 2 x 2 tokens, cut at the edge
TOKENS = (H // 8) * (W // 8)


def image_prompt(rng, before: int, images: int = 1) -> np.ndarray:
    """A prompt row: text, then per image <|vision_start|> 15 image tokens <|vision_end|>, text."""
    parts = [random_ids(rng, 1, before)[0]]
    for _ in range(images):
        parts += [[START], [IMAGE_TOKEN] * TOKENS, [END], random_ids(rng, 1, 2)[0]]
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen")
    hf = build(QWEN, qwen2_5_vl_config())
    model, params = vj.load_pretrained(save(hf, path / "hf"))
    rng = np.random.default_rng(5)
    ids, mask = left_pad([image_prompt(rng, 2, images=2), image_prompt(rng, 6)], 48)
    ids = ids.astype(np.int64)  # (transformers writes its 3-D ids in the ids' dtype)
    pixels = rng.standard_normal((3, 3, H, W)).astype(np.float32)
    return dict(hf=hf, model=model, params=params, ids=ids, mask=mask, pixels=pixels, path=path,
                hf_inputs=qwen_hf_inputs(ids, pixels))


def _hf_forward(d, hf=None, **kw):
    with torch.no_grad():
        return (hf or d["hf"])(input_ids=torch.tensor(d["ids"]), attention_mask=torch.tensor(d["mask"]),
                               **{k: torch.tensor(v) for k, v in d["hf_inputs"].items()}, **kw)


def hf_vit_order(grid: tuple, window_tokens: int) -> np.ndarray:
    """[gh * gw]: the row-major patch index of each token of transformers' tower sequence (its
    processor's 2 x 2 blocks, then reordered window by window)."""
    from transformers.vision_utils import get_vision_window_index

    gh, gw = grid
    q = np.arange(gh * gw)
    block, within = q // 4, q % 4
    row = (block // (gw // 2)) * 2 + within // 2
    col = (block % (gw // 2)) * 2 + within % 2
    processor = row * gw + col
    index, _ = get_vision_window_index(torch.tensor([[1, gh, gw]]), 2, window_tokens * 8, 4)
    return processor.reshape(-1, 4)[index.numpy()].reshape(-1)


@pytest.mark.slow
def test_qwen_parity_generation_scan_and_round_trip(qwen):
    """Logits, LLM hidden states and attention weights over left-padded rows (two images in one
    row, so the second image's 3-D ids start after the first's extent), the merger output, greedy
    generation with the KV cache (decode positions past the images' rope deltas), the scanned
    layout, and the export transformers loads (the same keys as its own save)."""
    d = qwen
    model, params = d["model"], d["params"]
    out = jit_apply(model, {"params": params}, jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]),
                    attention_mask=jnp.asarray(d["mask"]), output_hidden_states=True,
                    output_attentions=True, output_vision=True)
    ref = _hf_forward(d, output_hidden_states=True, output_attentions=True)
    keep = d["mask"].astype(bool)
    assert_close(np.asarray(out.logits)[keep], t2n(ref.logits)[keep], what="logits")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
        assert_close(np.asarray(a)[keep], t2n(b)[keep], what=f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions, strict=True)):
        qk = keep[:, None, :, None] & keep[:, None, None, :]
        assert_close(np.where(qk, a, 0), np.where(qk, t2n(b), 0), what=f"attentions[{i}]")
    assert_close(np.asarray(out.image_features).reshape(-1, 64),
                 t2n(torch.cat(ref.image_outputs.pooler_output)), what="merger output")
    check_generation_and_scan(d["hf"], model, params, d, ref.logits, 5, **d["hf_inputs"])
    back = vj.save_pretrained(model, params, d["path"] / "back")
    assert set(load_file(str(back / "model.safetensors"))) == set(load_file(str(d["path"] / "hf" / "model.safetensors")))
    assert vj.load_pretrained(back)[0].config == model.config
    assert_close(t2n(_hf_forward(d, QWEN.from_pretrained(str(back)).eval()).logits)[keep],
                 t2n(ref.logits)[keep], what="transformers on our export")


def test_qwen_tower_tokens_and_sinks_before_the_merger(qwen):
    """Every block's tokens equal transformers' (its sequence permuted back to row-major
    patches); each visual token's sink feature is the largest-norm last-block token of its
    2 x 2 window and vision_token_index names that patch."""
    d = qwen
    out = jit_apply(d["model"], {"params": d["params"]}, jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]),
                    attention_mask=jnp.asarray(d["mask"]), output_vision=True)
    hf_in = d["hf_inputs"]
    with torch.no_grad():
        vit = d["hf"].model.visual(torch.tensor(hf_in["pixel_values"][:TOKENS * 4]),
                                   grid_thw=torch.tensor(hf_in["image_grid_thw"][:1]), output_hidden_states=True)
    order = hf_vit_order((H // 4, W // 4), 2)
    ours = out.vision_outputs.hidden_states
    for i, (state, mine) in enumerate(zip(vit.hidden_states, ours, strict=True)):
        assert_close(np.asarray(mine[0])[order], t2n(state), what=f"tower hidden_states[{i}]")
    last = np.asarray(ours[-1][0])                                     # [60, 32] row-major
    windows = last.reshape(3, 2, 5, 2, 32).transpose(0, 2, 1, 3, 4).reshape(15, 4, 32)
    local = np.linalg.norm(windows, axis=-1).argmax(-1)
    cell = np.arange(15)
    patch = ((cell // 5) * 2 + local // 2) * 10 + (cell % 5) * 2 + local % 2
    np.testing.assert_array_equal(out.vision_token_index[0], patch)
    assert_close(out.vision_features[0], last[patch], what="sink features")


def test_mrope_positions_equal_get_rope_index(qwen):
    """The 3-D ids of left-padded rows with one and two images equal transformers'
    get_rope_index (pads aside), from a cache's start position too."""
    d = qwen
    ids, mask = d["ids"], d["mask"]
    ref, _ = d["hf"].model.get_rope_index(torch.tensor(ids), torch.tensor(d["hf_inputs"]["mm_token_type_ids"]),
                                          torch.tensor(d["hf_inputs"]["image_grid_thw"]),
                                          attention_mask=torch.tensor(mask))
    ours = np.asarray(mrope_positions(jnp.asarray(ids), jnp.asarray(mask), IMAGE_TOKEN, (3, 5)))
    keep = mask.astype(bool)
    np.testing.assert_array_equal(ours[keep], ref.numpy().transpose(1, 2, 0)[keep])
    shifted = np.asarray(mrope_positions(jnp.asarray(ids), jnp.asarray(mask), IMAGE_TOKEN, (3, 5),
                                         jnp.asarray([4, 9])))
    np.testing.assert_array_equal(shifted - ours, np.broadcast_to(np.asarray([4, 9])[:, None, None], ours.shape))


@pytest.mark.parametrize("select,positions", [("all", "original"), ("sinks", "sequential"),
                                              ("nonsinks", "original"), ("all", "family")])
def test_qwen_sink_to_the_front_moves_the_3d_ids(qwen, select, positions):
    """The two largest-norm visual tokens of the one-image row move to the front of its tokens
    (or alone stay / are removed): transformers fed the rearranged merger outputs and, by hand,
    the 3-D ids (each token's own with "original"; the image's raster ids in the new order with
    "sequential") gives the same logits at every kept token. The policy's default ("family")
    is "original" under multimodal RoPE: each token keeps its own (t, h, w) ids."""
    d = qwen
    policy = VisualTokenPolicy("front", select, positions, rule=vj.SinkRule("topk", k=2))
    if positions == "family":
        assert VisualTokenPolicy("front").positions == "family"
        assert d["model"].clone(visual_tokens=policy).policy.positions == "original"
        positions = "original"
    model = d["model"].clone(visual_tokens=policy)
    out = jax.jit(lambda p, i, x, m: model.apply({"params": p}, i, x, attention_mask=m, output_vision=True))(
        d["params"], jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]), jnp.asarray(d["mask"]))
    hf_in = d["hf_inputs"]
    with torch.no_grad():
        feats = t2n(d["hf"].model.get_image_features(torch.tensor(hf_in["pixel_values"][-TOKENS * 4:]),
                                                     torch.tensor(hf_in["image_grid_thw"][-1:])).pooler_output[0])
    sinks = np.asarray(out.visual_arrangement.sink_mask)[-1]
    assert sinks.sum() == 2
    idx = np.arange(TOKENS)
    order = {"all": np.r_[idx[sinks], idx[~sinks]], "sinks": idx[sinks], "nonsinks": idx[~sinks]}[select]
    row = 1
    mask = d["mask"][row].astype(bool)
    ids = d["ids"][row][mask]
    stock = np.asarray(mrope_positions(jnp.asarray(ids[None]), None, IMAGE_TOKEN, (3, 5)))[0]
    slots = np.flatnonzero(ids == IMAGE_TOKEN)
    with torch.no_grad():
        emb = t2n(d["hf"].get_input_embeddings()(torch.tensor(ids)))
    image_ids = stock[slots][order] if positions == "original" else stock[slots][:len(order)]
    seq = np.concatenate([emb[:slots[0]], feats[order], emb[slots[-1] + 1:]])
    pos = np.concatenate([stock[:slots[0]], image_ids, stock[slots[-1] + 1:]])
    with torch.no_grad():
        ref = t2n(d["hf"](inputs_embeds=torch.tensor(seq[None]),
                          position_ids=torch.tensor(pos.T[:, None, :].copy())).logits)[0]
    kept = np.r_[np.arange(slots[0]), slots[0] + np.arange(len(order)), np.arange(slots[-1] + 1, len(ids))]
    assert_close(np.asarray(out.logits[row])[np.flatnonzero(mask)[kept]], ref, what=f"{select} / {positions}")


@pytest.mark.slow
def test_qwen_dynamic_resolution_equals_the_processor_and_bad_sizes_raise(qwen):
    """Qwen2VLImageProcessor (PIL) on photos of three aspect ratios: our resize and the patches
    the model cuts equal its flattened patches and grid; the model runs on the processor's
    size, generation with FastV's pruned cache too; a size off the 8 px unit and a prompt with more image tokens than the pixels give
    raise errors naming the shapes; the prompt format brackets the image ids."""
    from PIL import Image
    from skimage import data

    from vitsink_jax.data.preprocess import preprocess, preprocess_qwen2_5_vl
    from vitsink_jax.data.prompts import prompt_format

    d = qwen
    proc = transformers.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2,
                                                 size={"shortest_edge": 8 * 8 * 4, "longest_edge": 8 * 8 * 24})
    for name in ("astronaut", "coffee", "rocket"):
        photo = getattr(data, name)()
        ref = proc(images=Image.fromarray(photo), return_tensors="np")
        ours = preprocess_qwen2_5_vl(photo, 8, 8 * 8 * 4, 8 * 8 * 24)
        assert ours.shape[1:] == tuple(ref["image_grid_thw"][0][1:] * 4)
        np.testing.assert_allclose(proc.patchify(ours, 4, 2, 2)[0], ref["pixel_values"], atol=1e-5)
    shapes = {name: preprocess_qwen2_5_vl(getattr(data, name)(), 8, 8 * 8 * 4, 8 * 8 * 24).shape
              for name in ("coffee", "rocket")}
    assert shapes == {"coffee": (3, 32, 48), "rocket": (3, 32, 40)}  # aspect ratios kept, areas capped
    config = d["model"].config
    assert preprocess(config, [data.coffee()]).shape == (1, 3, 16, 16)
    fmt = prompt_format(config)
    assert fmt.image.ids() == [START] + [IMAGE_TOKEN] * 4 + [END] and fmt.chat.name == "qwen2_5_vl"
    pixels = preprocess_qwen2_5_vl(data.coffee(), 8, 8 * 8 * 4, 8 * 8 * 24)[None]
    ids = np.r_[[5, START], [IMAGE_TOKEN] * 24, [END, 6]][None]
    hf_in = qwen_hf_inputs(ids, pixels)
    with torch.no_grad():
        ref = t2n(d["hf"](input_ids=torch.tensor(ids), **{k: torch.tensor(v) for k, v in hf_in.items()}).logits)
    out = jit_apply(d["model"], {"params": d["params"]}, jnp.asarray(ids), jnp.asarray(pixels))
    assert_close(out.logits, ref, what="a 32 x 48 photo")
    # FastV's shorter cache is sized by the image's 24 tokens, not the config's 4
    pruned = d["model"].clone(interventions=Interventions(prune=TokenPruning(1, 0.5, True)),
                              visual_tokens=VisualTokenPolicy(rule=vj.SinkRule("topk", k=2)))
    first = jit_apply(pruned, {"params": d["params"]}, jnp.asarray(ids), jnp.asarray(pixels)).logits[0, -1].argmax()
    tokens = generate(pruned, d["params"], ids, np.ones_like(ids), pixels, 3)
    assert tokens.shape == (1, 3) and int(tokens[0, 0]) == int(first)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(1, 3, 20, 48\).*multiples of 8"):
        d["model"].apply({"params": d["params"]}, jnp.asarray(ids), jnp.zeros((1, 3, 20, 48)))
    with pytest.raises(ValueError, match="contain 48 image tokens .* 1 image"):
        d["model"].apply({"params": d["params"]}, jnp.asarray(np.r_[ids[0], ids[0]][None]), jnp.asarray(pixels))


@pytest.mark.slow
def test_qwen_checkpoint_runs_evaluate_modes(tmp_path):
    """A tiny random Qwen2.5-VL folder with its own tokenizer (ChatML, the vision tokens):
    analyze mode (Findings 1-4, the sinks read before the merger, relevance over the
    4 x 4 patch grid) and its interventions mode on 4 items: sink-aware FastV and VAR run with
    the 3-D ids; test-time registers are reported as not run (they do not fit its
    windowed tower); train.py's DIYSink recipe trains its two mergers for two steps. (~35 s:
    the modes and the training step compile their own programs.)"""
    from conftest import check_shared_prefix_scoring, evaluate_config, hf_tokenizer, train_diysink_briefly
    from vitsink_jax.data import prompts
    from vitsink_jax.data.synthetic import benchmark_corpus, embedded_benchmark

    from vitsink_jax.modes.analyze import run_analyze
    from vitsink_jax.modes.interventions import run_interventions

    tok = hf_tokenizer("qwen2_5_vl", tmp_path / "tok", benchmark_corpus() + list(prompts.TEMPLATES.values()))
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")]
    cfg = qwen2_5_vl_config(image_token_id=ids[0], vision_start_token_id=ids[1], vision_end_token_id=ids[2])
    cfg.text_config.vocab_size = len(tok)
    folder = save(build(QWEN, cfg), tmp_path / "qwen")
    tok.save_pretrained(str(folder))
    a = evaluate_config(tmp_path, folder)
    a.analysis.max_new_tokens, a.sink.k = 4, 2
    a.eval.batch_size = 4
    report = run_analyze(a, tmp_path / "analysis")
    entry = report["per_image"]["coffee.png"]
    assert len(entry["norms"]) == 4 and len(entry["sinks"]["topk"]) == 2
    assert (tmp_path / "analysis" / "plots" / "relevance_coffee.png").stat().st_size > 1000
    model, params = vj.load_pretrained(folder)
    a.eval.length_bucket = 32
    check_shared_prefix_scoring(model, params, tok, embedded_benchmark(0, 1, 28)[:4], a.eval)
    a.benchmark.limit, a.compare.decode_steps = 4, 2
    a.compare.specs = ("fastv+sinks:0.5:1", "var-vit:0.6:0", "registers:2")
    out = run_interventions(a, tmp_path / "interventions")
    assert set(out["results"]) == {"fastv+sinks:0.5:1", "var-vit:0.6:0"}
    assert "registers:2" in out["not_run"]
    assert all(0 <= r["accuracy"] <= 1 for r in out["results"].values())
    train_diysink_briefly(folder, tmp_path / "train")


@pytest.mark.parametrize("init", ["copy", "scratch"])
def test_qwen_diysink_and_its_checkpoint(qwen, tmp_path, init):
    """DIYSink on Qwen2.5-VL: with both mergers equal it is the stock model's sink-to-the-front;
    a fresh sink merger (reading the 2 x 2 windows side by side) round-trips through
    config.json, and transformers reads the checkpoint's non-sink path as its merger."""
    check_diysink(qwen, _hf_forward, QWEN, tmp_path, init)


@pytest.mark.slow
def test_bad_position_ids_and_configs_raise_by_name(qwen):
    """transformers' [3, B, T] ids, a tower without its model and M-RoPE sections that do not
    cover the head are refused with what to do."""
    d = qwen
    with pytest.raises(ValueError, match=r"position_ids have shape \(3, 1, 48\).*moveaxis"):
        d["model"].apply({"params": d["params"]}, jnp.asarray(d["ids"][1:]), jnp.asarray(d["pixels"][-1:]),
                         position_ids=jnp.zeros((3, 1, 48), jnp.int32))
    with pytest.raises(ValueError, match="a Qwen2.5-VL tower alone is not loaded"):
        vj.config_from_hf({"model_type": "qwen2_5_vl_vision"})
    bad = qwen2_5_vl_config().to_dict()
    bad["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ValueError, match=r"mrope_section \(2, 2, 2\) must sum to the rotary dims / 2 = 8"):
        vj.config_from_hf(bad)


@pytest.mark.slow
def test_qwen_takes_the_processors_outputs_as_they_are(tmp_path):
    """``model.apply(..., **processor(images=..., text=...))``: Qwen2_5_VLProcessor's flattened
    patches with image_grid_thw and its mm_token_type_ids go in as they are and give
    transformers' logits (two photos of one size); images of two sizes in one call are refused
    naming both grids."""
    from PIL import Image
    from skimage import data

    from conftest import hf_tokenizer

    tok = hf_tokenizer("qwen2_5_vl", tmp_path / "tok", ["What is on the table?"])
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")]
    cfg = qwen2_5_vl_config(image_token_id=ids[0], vision_start_token_id=ids[1], vision_end_token_id=ids[2])
    cfg.text_config.vocab_size = len(tok)
    hf = build(QWEN, cfg)
    model, params = vj.load_pretrained(save(hf, tmp_path / "hf"))
    image_proc = transformers.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2,
                                                       size={"shortest_edge": 16 * 24, "longest_edge": 16 * 24})
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    class ImagesOnly(Qwen2_5_VLProcessor):  # the video processor's class needs torchvision
        def check_argument_for_proper_class(self, name, argument):
            if name != "video_processor":
                super().check_argument_for_proper_class(name, argument)

    processor = ImagesOnly(image_processor=image_proc, tokenizer=tok, video_processor=None)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    photos = [Image.fromarray(data.coffee()).resize((24, 16)), Image.fromarray(data.astronaut()).resize((24, 16))]
    inputs = processor(images=photos, text=[f"{image}What is on {image} the table?"], return_tensors="np")
    assert "mm_token_type_ids" in inputs and len(inputs["image_grid_thw"]) == 2
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in inputs.items()}).logits
    out = model.apply({"params": params}, **inputs)
    assert_close(out.logits, t2n(ref), what="logits")
    photos[1] = photos[1].resize((16, 16))
    mixed = processor(images=photos, text=[f"{image}What is on {image} the table?"], return_tensors="np")
    with pytest.raises(ValueError, match=r"image_grid_thw holds .* patch grids \[\(1, 4, 6\), \(1, 6, 6\)\]"):
        model.apply({"params": params}, **mixed)
