"""Gemma 3 against transformers: the text LLM (local / global layers, q/k norms, scaled
embeddings, logit cap), the LVLM (pooled SigLIP, soft-embedding norm, bidirectional image
blocks) with KV-cache generation, the scanned layout and round trips transformers loads; the
sinks read on the ViT tokens, sink-to-the-front against transformers fed the rearranged
embeddings, and FastV on the Gemma 3 LLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import vitsink_jax as vj
from conftest import (IMAGE_TOKEN, assert_close, build, check_diysink, check_generation_and_scan, compare_causal_lm,
                      gemma3_config, gemma3_text_config, jit_apply, random_ids, save, save_bin, t2n)
from test_interventions import fastv_reference, run
from vitsink_jax.data.padding import left_pad
from vitsink_jax.interventions import TokenPruning
from vitsink_jax.interventions.registers import register_neurons
from vitsink_jax.sinks.fuse import VisualTokenPolicy

GEMMA3 = transformers.Gemma3ForConditionalGeneration
BOI, EOI = IMAGE_TOKEN - 2, IMAGE_TOKEN - 1


@pytest.mark.slow
def test_gemma3_text_parity_scan_and_round_trip(tmp_path, rng):
    """Left-padded rows of 14 tokens over a window of 5 (local layers) and linear-scaled RoPE
    (global layers), with the final logit cap of Gemma3ForCausalLM."""
    hf = build(transformers.Gemma3ForCausalLM, gemma3_text_config(final_logit_softcapping=3.0))
    ids, mask = left_pad([random_ids(rng, 1, n)[0] for n in (14, 9)], 14)
    compare_causal_lm(hf, tmp_path / "g", ids, mask)
    model, params = vj.load_pretrained(tmp_path / "g", scan_layers=True)
    assert model.config.layer_windows == (5, None, 5, None)
    with pytest.raises(ValueError, match="sliding_window"):  # its local layers are told by it
        vj.TextConfig.from_hf({**gemma3_text_config().to_dict(), "sliding_window": None})
    out = jit_apply(model, {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    with torch.no_grad():
        ref = t2n(hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits)
    keep = mask.astype(bool)
    assert_close(np.asarray(out.logits)[keep], ref[keep], what="scanned logits")
    assert np.abs(ref).max() <= 3.0  # the cap is in force
    vj.save_pretrained(model, params, tmp_path / "back")
    back = transformers.Gemma3ForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        again = t2n(back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits)
    assert_close(again[keep], ref[keep], what="round trip")
    assert set(load_file(str(tmp_path / "back" / "model.safetensors"))) == \
        set(load_file(str(tmp_path / "g" / "model.safetensors")))


def image_prompt(rng, before: int, after: int = 4) -> np.ndarray:
    """A Gemma 3 prompt row: text, <boi>, the image's 4 tokens, <eoi>, text."""
    return np.concatenate([random_ids(rng, 1, before)[0], [BOI], [IMAGE_TOKEN] * 4, [EOI],
                           random_ids(rng, 1, after)[0]])


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    hf = build(GEMMA3, gemma3_config())
    model, params = vj.load_pretrained(save(hf, path / "hf"))
    rng = np.random.default_rng(2)
    ids, mask = left_pad([image_prompt(rng, 2), image_prompt(rng, 5)], 16)
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    return dict(hf=hf, model=model, params=params, ids=ids, mask=mask, pixels=pixels, path=path,
                types=(ids == IMAGE_TOKEN).astype(np.int64))


def _hf_forward(d, hf=None, **kw):
    with torch.no_grad():
        return (hf or d["hf"])(input_ids=torch.tensor(d["ids"]), pixel_values=torch.tensor(d["pixels"]),
                               attention_mask=torch.tensor(d["mask"]),
                               token_type_ids=torch.tensor(d["types"]), **kw)


@pytest.mark.slow
def test_gemma3_lvlm_parity_generation_and_scan(gemma3):
    """Logits, hidden states, attentions (the image blocks attend bidirectionally: transformers
    with the processor's token_type_ids), the projector output, greedy generation with the KV
    cache over left-padded rows, and the scanned layout."""
    d = gemma3
    model, params = d["model"], d["params"]
    out = jit_apply(model, {"params": params}, jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]),
                    attention_mask=jnp.asarray(d["mask"]), output_hidden_states=True,
                    output_attentions=True, output_vision=True)
    ref = _hf_forward(d, output_hidden_states=True, output_attentions=True)
    keep = d["mask"].astype(bool)
    assert_close(np.asarray(out.logits)[keep], t2n(ref.logits)[keep], what="logits")
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(np.asarray(a)[keep], t2n(b)[keep], what=f"hidden_states[{i}]")
    qk = keep[:, None, :, None] & keep[:, None, None, :]
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions)):
        assert_close(np.where(qk, np.asarray(a), 0), np.where(qk, t2n(b), 0), what=f"attentions[{i}]")
    assert_close(out.image_features, t2n(ref.image_outputs.pooler_output), what="projector output")
    with torch.no_grad():
        causal = d["hf"](input_ids=torch.tensor(d["ids"]), pixel_values=torch.tensor(d["pixels"]),
                         attention_mask=torch.tensor(d["mask"])).logits
    assert np.abs(t2n(causal) - t2n(ref.logits))[keep].max() > 1e-2  # the blocks matter here
    check_generation_and_scan(d["hf"], model, params, d, ref.logits, 6, token_type_ids=d["types"])


def test_gemma3_round_trips_and_state_dict_spelling(gemma3):
    """save_pretrained writes what Gemma3ForConditionalGeneration loads (the same keys as its
    own save); a .bin of the in-memory state dict (``model.vision_tower.vision_model...``) loads."""
    d = gemma3
    out = vj.save_pretrained(d["model"], d["params"], d["path"] / "back")
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(d["path"] / "hf" / "model.safetensors")))
    keep = d["mask"].astype(bool)
    ref = t2n(_hf_forward(d).logits)[keep]
    assert_close(t2n(_hf_forward(d, GEMMA3.from_pretrained(str(out)).eval()).logits)[keep], ref,
                 what="transformers on our export")
    model, params = vj.load_pretrained(save_bin(d["hf"], d["path"] / "bin"))
    again = jit_apply(model, {"params": params}, jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]),
                      attention_mask=jnp.asarray(d["mask"]))
    assert_close(np.asarray(again.logits)[keep], ref, what="state-dict spelling")
    more = np.concatenate([d["ids"], np.full((2, 2), IMAGE_TOKEN)], 1)  # 12 image tokens, 2 images
    with pytest.raises(ValueError, match=r"12 image tokens .* 2 image\(s\) x 4 tokens = 8"):
        model.apply({"params": params}, jnp.asarray(more), jnp.asarray(d["pixels"]))


@pytest.mark.slow
def test_gemma3_sinks_are_read_on_the_vit_tokens(gemma3):
    """Each visual token carries the largest-norm ViT token of its 2 x 2 window, read before
    the tower's post-LayerNorm; vision_token_index names it on the 4 x 4 patch grid."""
    d = gemma3
    out = jit_apply(d["model"], {"params": d["params"]}, jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]),
                    output_vision=True)
    with torch.no_grad():
        vit = t2n(d["hf"].model.vision_tower(torch.tensor(d["pixels"]), output_hidden_states=True)
                  .hidden_states[-1])                                   # [2, 16, 32]
    norms = np.linalg.norm(vit, axis=-1).reshape(2, 2, 2, 2, 2)         # [N, row, r, col, c]
    windows = norms.transpose(0, 1, 3, 2, 4).reshape(2, 4, 4)
    local = windows.argmax(-1)
    cell = np.arange(4)
    index = ((cell // 2) * 2 + local // 2) * 4 + (cell % 2) * 2 + local % 2
    np.testing.assert_array_equal(out.vision_token_index, index)
    assert_close(out.vision_features, np.take_along_axis(vit, index[..., None], 1), what="sink features")


def _rearranged_reference(d, row, sinks, order, select, positions):
    """transformers' logits for one row whose visual tokens were rearranged (and deleted) by
    hand: the projected image tokens in the new order, token_type_ids on the kept image slots."""
    hf, ids, mask = d["hf"], d["ids"][row], d["mask"][row].astype(bool)
    ids = ids[mask]
    with torch.no_grad():
        emb = t2n(hf.get_input_embeddings()(torch.tensor(ids)))
        proj = t2n(hf.model.get_image_features(torch.tensor(d["pixels"][row:row + 1])).pooler_output)[0]
    idx = np.arange(4)
    groups = {"front": [idx[sinks], idx[~sinks]], "end": [idx[~sinks], idx[sinks]]}[order]
    keep = {"all": np.ones(4, bool), "sinks": sinks, "nonsinks": ~sinks}[select]
    new = np.concatenate([g[keep[g]] for g in groups])
    slots = np.flatnonzero(ids == IMAGE_TOKEN)
    seq = np.concatenate([emb[:slots[0]], proj[new], emb[slots[-1] + 1:]])
    types = np.zeros(len(seq), np.int64)
    types[slots[0]:slots[0] + len(new)] = 1
    pos = np.arange(len(seq))
    if positions == "original":
        pos = np.concatenate([np.arange(slots[0]), slots[new], np.arange(slots[-1] + 1, len(ids))])
    with torch.no_grad():
        # an explicit padding mask: without one transformers reads non-increasing position ids
        # as several packed sequences
        out = hf(inputs_embeds=torch.tensor(seq[None]), position_ids=torch.tensor(pos[None]),
                 attention_mask=torch.ones((1, len(seq)), dtype=torch.long),
                 token_type_ids=torch.tensor(types[None]))
    kept = np.concatenate([np.arange(slots[0]), slots[:len(new)], np.arange(slots[-1] + 1, len(ids))])
    return t2n(out.logits)[0], np.flatnonzero(mask)[kept]


@pytest.mark.parametrize("order,select,positions", [("front", "all", "sequential"),
                                                    ("front", "sinks", "sequential"),
                                                    ("end", "nonsinks", "original"),
                                                    ("end", "all", "original")])
@pytest.mark.slow
def test_gemma3_sink_to_the_front_matches_transformers(gemma3, order, select, positions):
    """The two largest-norm visual tokens of each image (top-k rule) move inside Gemma 3's image
    block (or stay alone), and the block still attends bidirectionally."""
    d = gemma3
    policy = VisualTokenPolicy(order, select, positions, vj.SinkRule("topk", k=2))
    model = d["model"].clone(visual_tokens=policy)
    out = jax.jit(lambda p, i, x, m: model.apply({"params": p}, i, x, attention_mask=m, output_vision=True))(
        d["params"], jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]), jnp.asarray(d["mask"]))
    for row in range(2):
        sinks = np.asarray(out.visual_arrangement.sink_mask[row])
        norms = np.linalg.norm(np.asarray(out.vision_features[row]), axis=-1)
        np.testing.assert_array_equal(sinks, norms >= np.sort(norms)[-2])
        ref, slots = _rearranged_reference(d, row, sinks, order, select, positions)
        assert_close(np.asarray(out.logits[row])[slots], ref, what=f"row {row} logits")


@pytest.mark.slow
def test_fastv_on_gemma3_equals_transformers_on_the_kept_tokens(tmp_path):
    """FastV after layer 2 of a local / global Gemma 3 LLM (window above the row's 20 slots)."""
    hf = build(transformers.Gemma3ForCausalLM, gemma3_text_config(sliding_window=24))
    model, params = vj.load_pretrained(save(hf, tmp_path / "g"))
    ids = random_ids(np.random.default_rng(1), 2, 20)
    visual = np.zeros(ids.shape, bool)
    visual[:, 3:15] = True
    sinks = np.zeros(ids.shape, bool)
    sinks[0, [5, 9]] = sinks[1, 4] = True
    kept, ref = fastv_reference(hf, ids, visual, sinks, 2, 0.5, True)
    out = run(model, params, ids, visual, sinks, prune=TokenPruning(2, 0.5, True))
    assert_close(np.take_along_axis(np.asarray(out.logits), kept[..., None], 1), ref,
                 what="Gemma 3 logits at the kept tokens")


# Gemma 3's chat template as its checkpoints ship it (the system turn folded into the first user
# turn, images as <start_of_image>, text items trimmed)
CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = "
    "messages[0]['content'][0]['text'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if message['role'] == 'assistant' -%}"
    "{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}")


def test_gemma3_prompts_equal_the_processor(tmp_path):
    """A LLaVA-template evaluation prompt and a training conversation, rendered in Gemma 3's
    chat markup with the image expanded as Gemma3Processor does (``\\n\\n<boi>`` 4 image tokens
    ``<eoi>\\n\\n``, the newlines tokenized with their neighbours), give the processor's ids,
    token types and pixels for a photo of another aspect ratio."""
    from PIL import Image
    from skimage import data

    from conftest import hf_tokenizer
    from vitsink_jax import eval_lib as E
    from vitsink_jax.data.instruct import tokenize_conversation
    from vitsink_jax.data.preprocess import preprocess
    from vitsink_jax.data.prompts import TEMPLATES, human_text, prompt_format

    question = "What is on the table?"
    tok = hf_tokenizer("gemma", tmp_path, [question, "user\n\n\nmodel\n\n", TEMPLATES["open"], "A cat"])
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in
           (("image", "<image_soft_token>"), ("boi", "<start_of_image>"), ("eoi", "<end_of_image>"))}
    config = vj.config_from_hf(gemma3_config(gemma3_text_config(vocab_size=len(tok)),
                                             image_token_index=ids["image"], boi_token_index=ids["boi"],
                                             eoi_token_index=ids["eoi"]).to_dict())
    processor = transformers.Gemma3Processor(
        transformers.Gemma3ImageProcessorPil(size={"height": 28, "width": 28}), tok,
        chat_template=CHAT_TEMPLATE, image_seq_length=4)
    photo = Image.fromarray(data.coffee())
    prompt = TEMPLATES["open"].format(question=question)
    user = [{"type": "image", "image": photo}, {"type": "text", "text": human_text(prompt)[len("<image>\n"):]}]
    ref = processor.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True, return_tensors="np")
    fmt = prompt_format(config)
    ours, question_mask = E.encode_question_prompt(tok, prompt, fmt)
    np.testing.assert_array_equal(ours, ref["input_ids"][0])
    np.testing.assert_array_equal(ours == ids["image"], ref["token_type_ids"][0] == 1)
    assert tok.decode(ours[question_mask]).startswith(question)
    np.testing.assert_allclose(preprocess(config, [photo]), ref["pixel_values"], atol=1e-5)
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "A cat"}]}]
    full = processor.apply_chat_template([{"role": "user", "content": user}] + answer, tokenize=True,
                                         return_dict=True, return_tensors="np")["input_ids"][0]
    conv, loss, _ = tokenize_conversation(tok, ["human", "gpt"], [human_text(prompt), "A cat"], fmt)
    np.testing.assert_array_equal(conv, full)
    # the loss starts at the answer (this tiny BPE merged "\nA", so it starts a byte early)
    assert tok.decode(conv[loss]).endswith("A cat<end_of_turn>\n") and loss[-1] and loss.sum() <= 5


@pytest.mark.slow
def test_gemma3_checkpoint_runs_evaluate_modes(tmp_path):
    """A tiny random Gemma 3 folder with its own Gemma-style tokenizer: benchmark items scored
    in Gemma 3's chat markup as the benchmark and interventions modes score them (stock and with
    sink-aware FastV), analyze mode (Findings 1-4: sinks read on the ViT tokens, maps
    over the 2 x 2 visual-token grid, relevance over the 4 x 4 patch grid), and test-time
    register neurons found on the ViT tokens the sinks are read on; train.py's DIYSink recipe
    trains its two projectors for two steps. (~35 s: the analysis and the training step compile
    their own programs.)"""
    from conftest import check_shared_prefix_scoring, evaluate_config, hf_tokenizer, train_diysink_briefly
    from vitsink_jax import eval_lib
    from vitsink_jax.data import prompts
    from vitsink_jax.data.synthetic import benchmark_corpus, embedded_benchmark
    from vitsink_jax.interventions import Interventions

    from vitsink_jax.modes.analyze import run_analyze

    tok = hf_tokenizer("gemma", tmp_path / "tok", benchmark_corpus() + list(prompts.TEMPLATES.values()))
    ids = [tok.convert_tokens_to_ids(t) for t in ("<image_soft_token>", "<start_of_image>", "<end_of_image>")]
    cfg = gemma3_config(gemma3_text_config(vocab_size=len(tok), sliding_window=512),
                        image_token_index=ids[0], boi_token_index=ids[1], eoi_token_index=ids[2])
    folder = save(build(GEMMA3, cfg), tmp_path / "gemma3")
    tok.save_pretrained(str(folder))
    a = evaluate_config(tmp_path, folder)
    a.analysis.max_new_tokens, a.sink.k = 4, 2
    a.eval.batch_size = 4
    report = run_analyze(a, tmp_path / "analysis")
    entry = report["per_image"]["coffee.png"]
    assert len(entry["norms"]) == 4 and len(entry["sinks"]["topk"]) == 2
    assert (tmp_path / "analysis" / "plots" / "relevance_coffee.png").stat().st_size > 1000
    model, params = vj.load_pretrained(folder)
    records = embedded_benchmark(0, 1, 28)[:4]
    a.eval.length_bucket = 32
    pruned = model.clone(interventions=Interventions(prune=TokenPruning(1, 0.5, True)),
                         visual_tokens=VisualTokenPolicy(rule=vj.SinkRule("topk", k=1)))
    check_shared_prefix_scoring(model, params, tok, records, a.eval)
    preds = eval_lib.predict(pruned, params, tok, records, a.eval)
    assert len(preds) == 4 and all(np.isfinite(p["scores"]).all() for p in preds)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    assert len(register_neurons(model, params, pixels, vj.SinkRule("topk", k=1), 2)) == 2
    train_diysink_briefly(folder, tmp_path / "train")


@pytest.mark.parametrize("init", ["copy", "scratch"])
def test_gemma3_diysink_and_its_checkpoint(gemma3, tmp_path, init):
    """DIYSink on Gemma 3: with both projectors equal it is the stock model's sink-to-the-front
    (sinks first inside the image block); a fresh sink projector round-trips through
    config.json, and transformers reads the checkpoint's non-sink path as its projector."""
    check_diysink(gemma3, _hf_forward, GEMMA3, tmp_path, init)


@pytest.mark.slow
def test_gemma3_takes_the_processors_outputs_as_they_are(tmp_path):
    """``model.apply(..., **processor(images=..., text=...))``: Gemma3Processor's ids, mask,
    pixels and token_type_ids go in as they are and give transformers' logits; token types that
    disagree with the image tokens are refused."""
    from PIL import Image
    from skimage import data

    from conftest import hf_tokenizer

    tok = hf_tokenizer("gemma", tmp_path / "tok", ["What is on the table?"])
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in
           (("image", "<image_soft_token>"), ("boi", "<start_of_image>"), ("eoi", "<end_of_image>"))}
    hf = build(GEMMA3, gemma3_config(gemma3_text_config(vocab_size=len(tok), sliding_window=7),
                                     image_token_index=ids["image"], boi_token_index=ids["boi"],
                                     eoi_token_index=ids["eoi"]))
    model, params = vj.load_pretrained(save(hf, tmp_path / "hf"))
    processor = transformers.Gemma3Processor(
        transformers.Gemma3ImageProcessorPil(size={"height": 28, "width": 28}), tok,
        chat_template=CHAT_TEMPLATE, image_seq_length=4)
    inputs = processor(images=[Image.fromarray(data.coffee())], text="<start_of_image> What is on the table?",
                       return_tensors="np")
    assert "token_type_ids" in inputs
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in inputs.items()}).logits
    out = jit_apply(model, {"params": params}, **inputs)
    assert_close(out.logits, t2n(ref), what="logits")
    with pytest.raises(ValueError, match="token_type_ids .* marks 0 image token"):
        model.apply({"params": params}, **{**inputs, "token_type_ids": 0 * inputs["token_type_ids"]})
