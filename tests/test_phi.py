"""Phi-2 and Phi-3 against transformers: the LLMs alone (fp32 logits, hidden states, attention
weights), inside a LLaVA (SigLIP + Phi), KV-cache generation, the scanned layout, and round
trips through save_pretrained that transformers loads (Phi-3's fused tensors written fused)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import vitsink_jax as vj
from conftest import (IMAGE_TOKEN, assert_close, build, compare_causal_lm, jit_apply, llava_config,
                      phi3_config, phi_config, random_ids, save, siglip_vision_config, t2n)
from test_lvlm import prompt_with_images
from vitsink_jax.data.padding import left_pad
from vitsink_jax.generate import generate

CAUSAL = {"phi": (transformers.PhiForCausalLM, phi_config),
          "phi3": (transformers.Phi3ForCausalLM, phi3_config)}


def _left_padded(rng, lengths, width):
    ids, mask = left_pad([random_ids(rng, 1, n)[0] for n in lengths], width)
    return ids, mask


def _round_trip(model, params, cls, out, ids, mask, ref):
    """save_pretrained -> transformers' class loads it -> the same logits."""
    vj.save_pretrained(model, params, out)
    back = cls.from_pretrained(str(out)).eval()
    with torch.no_grad():
        again = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    keep = mask.astype(bool)
    assert_close(t2n(again)[keep], t2n(ref)[keep], what="round trip")


@pytest.mark.parametrize("family", ["phi", "phi3"])
def test_phi_llm_parity_and_round_trip(tmp_path, rng, family):
    """Left-padded batch of 14 tokens: Phi-2 with partial rotary + qk LayerNorm + GQA; Phi-3
    with fused tensors, longrope past its 8 original positions and a window of 5 slots."""
    cls, config = CAUSAL[family]
    hf = build(cls, config())
    ids, mask = _left_padded(rng, (14, 9), 14)
    compare_causal_lm(hf, tmp_path / family, ids, mask)
    model, params = vj.load_pretrained(tmp_path / family)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    _round_trip(model, params, cls, tmp_path / "back", ids, mask, ref)
    keys = set(load_file(str(tmp_path / "back" / "model.safetensors")))
    assert keys == set(load_file(str(tmp_path / family / "model.safetensors")))
    if family == "phi":
        assert params["lm_head"]["bias"].shape == (hf.config.vocab_size,)
        assert "q_layernorm" in params["model"]["layers_0"]["self_attn"]
    else:  # split on load into LLaMA's q / k / v and gate / up
        attn = params["model"]["layers_0"]["self_attn"]
        assert attn["q_proj"]["kernel"].shape == (64, 64) and attn["k_proj"]["kernel"].shape == (64, 32)
        assert "model.layers.0.self_attn.qkv_proj.weight" in keys


def test_phi2_tied_embeddings_keep_the_head_bias(tmp_path, rng):
    hf = build(transformers.PhiForCausalLM, phi_config(tie_word_embeddings=True, qk_layernorm=False))
    compare_causal_lm(hf, tmp_path / "tied", random_ids(rng, 2, 10), full=False)
    _, params = vj.load_pretrained(tmp_path / "tied")
    assert set(params["lm_head"]) == {"bias"}


def test_phi3_fused_tensor_of_the_wrong_size_is_named(tmp_path):
    hf = build(transformers.Phi3ForCausalLM, phi3_config())
    save(hf, tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json")
    import json
    d = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**d, "num_key_value_heads": 4}))
    with pytest.raises(vj.CheckpointError, match=r"fused tensor 'model.layers.0.self_attn.qkv_proj.weight' "
                       r"has shape \(128, 64\) .* stacked"):
        vj.load_pretrained(tmp_path / "m")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["phi", "phi3"])
def test_siglip_phi_llava_parity_generation_and_scan(tmp_path, rng, family):
    """transformers' LlavaForConditionalGeneration builds its LM from text_config, so SigLIP +
    Phi is a real reference: logits, greedy generation with the KV cache (left-padded rows, the
    window sliding past the prompt), and the scanned layout's logits."""
    text = CAUSAL[family][1](vocab_size=128)
    cfg = llava_config(vision=siglip_vision_config(vision_use_head=False), text=text,
                       vision_feature_layer=-1, vision_feature_select_strategy="full")
    hf = build(transformers.LlavaForConditionalGeneration, cfg)
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    assert "bias" not in params["language_model"]["lm_head"]  # Llava's own head has none
    rows = [prompt_with_images(rng, 1, 16, before=b)[0] for b in (2, 5)]
    ids, mask = left_pad(rows, 16 + 11)
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    out = jit_apply(model, {"params": params}, jnp.asarray(ids), jnp.asarray(pixels),
                    attention_mask=jnp.asarray(mask))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                 attention_mask=torch.tensor(mask))
        gen = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
    keep = mask.astype(bool)
    assert_close(np.asarray(out.logits)[keep], t2n(ref.logits)[keep], what="logits")
    np.testing.assert_array_equal(np.asarray(generate(model, params, ids, mask, pixels, 6)), gen)
    scanned = model.clone(scan_layers=True).apply({"params": vj.stack_layers(params)}, jnp.asarray(ids),
                                                  jnp.asarray(pixels), attention_mask=jnp.asarray(mask))
    assert_close(np.asarray(scanned.logits)[keep], t2n(ref.logits)[keep], what="scanned logits")
    assert (ids == IMAGE_TOKEN).sum() == 32
