"""Checkpoint formats, dtypes, round trips through transformers, and every error case."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import vitsink_jax as vj
from conftest import (assert_close, build, clip_vision_config, gemma3_config, gemma3_text_config,
                      internvl_config, jit_apply, llama_config, llava_config,
                      qwen2_config, random_ids, save, save_bin, siglip_vision_config, t2n)
from test_lvlm import prompt_with_images

LLAVA = transformers.LlavaForConditionalGeneration


def _llava_inputs(rng):
    return prompt_with_images(rng, 1, 16), rng.standard_normal((1, 3, 28, 28)).astype(np.float32)


def _logits(model, params, ids, pixels=None):
    args = (jnp.asarray(ids),) if pixels is None else (jnp.asarray(ids), jnp.asarray(pixels))
    return np.asarray(jit_apply(model, {"params": params}, *args).logits)


def _hf_logits(hf, ids, pixels=None):
    with torch.no_grad():
        kw = {} if pixels is None else {"pixel_values": torch.tensor(pixels)}
        return t2n(hf(input_ids=torch.tensor(ids), **kw).logits)


def test_sharded_safetensors(tmp_path, rng):
    hf = build(LLAVA, llava_config())
    path = save(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 2
    ids, pixels = _llava_inputs(rng)
    model, params = vj.load_pretrained(path, progress=True)
    assert_close(_logits(model, params, ids, pixels), _hf_logits(hf, ids, pixels), what="logits")


def test_pytorch_bin(tmp_path, rng):
    hf = build(LLAVA, llava_config())
    path = save_bin(hf, tmp_path / "bin")
    assert (path / "pytorch_model.bin").exists() and not (path / "model.safetensors").exists()
    ids, pixels = _llava_inputs(rng)
    model, params = vj.load_pretrained(path)
    assert_close(_logits(model, params, ids, pixels), _hf_logits(hf, ids, pixels), what="logits")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bf16_checkpoint_cast_to_fp32(tmp_path, rng, fmt):
    hf = build(LLAVA, llava_config())
    hf16 = hf.to(torch.bfloat16)
    path = (save if fmt == "safetensors" else save_bin)(hf16, tmp_path / "bf16")
    ref_model = hf16.float()  # the bf16-rounded weights, computed in fp32
    ids, pixels = _llava_inputs(rng)
    model, params = vj.load_pretrained(path, dtype=jnp.float32)
    assert params["multi_modal_projector"]["linear_1"]["kernel"].dtype == jnp.float32
    assert_close(_logits(model, params, ids, pixels), _hf_logits(ref_model, ids, pixels),
                 what="logits")


CASES = {
    "llava": (LLAVA, lambda: llava_config(), True),
    "llava_siglip_qwen2": (LLAVA, lambda: llava_config(
        vision=siglip_vision_config(vision_use_head=False), text=qwen2_config(),
        vision_feature_select_strategy="full", vision_feature_layer=-1), True),
    "llama": (transformers.LlamaForCausalLM, lambda: llama_config(
        rope_scaling=dict(rope_type="linear", factor=2.0, rope_theta=1000.0)), False),
    "qwen2": (transformers.Qwen2ForCausalLM, qwen2_config, False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_through_transformers(tmp_path, rng, name):
    cls, cfg, multimodal = CASES[name]
    hf = build(cls, cfg())
    model, params = vj.load_pretrained(save(hf, tmp_path / "src"))
    vj.save_pretrained(model, params, tmp_path / "ours")
    back = cls.from_pretrained(str(tmp_path / "ours")).eval()
    if multimodal:
        ids, pixels = _llava_inputs(rng)
    else:
        ids, pixels = random_ids(rng, 2, 11), None
    ref = _hf_logits(hf, ids, pixels)
    assert_close(_hf_logits(back, ids, pixels), ref, tol=1e-6, what="transformers(saved by us)")
    assert_close(_logits(model, params, ids, pixels), ref, what="ours")
    # and our own loader reads what we wrote
    model2, params2 = vj.load_pretrained(tmp_path / "ours")
    np.testing.assert_array_equal(_logits(model2, params2, ids, pixels), _logits(model, params, ids, pixels))


@pytest.mark.parametrize("cls,cfg", [(transformers.CLIPVisionModel, clip_vision_config),
                                     (transformers.SiglipVisionModel, siglip_vision_config)])
def test_vision_round_trip(tmp_path, rng, cls, cfg):
    hf = build(cls, cfg())
    model, params = vj.load_pretrained(save(hf, tmp_path / "src"))
    vj.save_pretrained(model, params, tmp_path / "ours")
    back = cls.from_pretrained(str(tmp_path / "ours")).eval()
    pixels = torch.tensor(rng.standard_normal((1, 3, 28, 28)).astype(np.float32))
    with torch.no_grad():
        assert_close(t2n(back(pixels).pooler_output), t2n(hf(pixels).pooler_output), tol=1e-6)


def test_save_is_atomic_and_refuses_to_clobber(tmp_path):
    hf = build(transformers.LlamaForCausalLM, llama_config(num_hidden_layers=1))
    model, params = vj.load_pretrained(save(hf, tmp_path / "src"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        vj.save_pretrained(model, params, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    vj.save_pretrained(model, params, out, overwrite=True)
    # the folder is replaced whole: a leftover file of another model (here notes.txt; in the
    # hostile probe a special_tokens_map.json) never sits beside the new model's files
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # nothing left aside


# ------------------------------------------------------------------------------ error cases

@pytest.fixture
def llama_dir(tmp_path):
    return save(build(transformers.LlamaForCausalLM, llama_config(num_hidden_layers=2)),
                tmp_path / "llama")


def _edit_tensors(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_missing_tensor_is_listed(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(vj.CheckpointError, match=r"missing tensors \(1\): "
                       r"model/layers_1/mlp/up_proj/kernel \(HF model.layers.1.mlp.up_proj.weight\)"):
        vj.load_pretrained(llama_dir)


def test_unexpected_tensor_is_listed(llama_dir):
    _edit_tensors(llama_dir, lambda t: t.update({"model.layers.7.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(vj.CheckpointError, match=r"unexpected tensors \(1\): model.layers.7.extra.weight"):
        vj.load_pretrained(llama_dir)


def test_shape_mismatch_names_tensor_and_both_shapes(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(vj.CheckpointError, match=r"model.safetensors: tensor "
                       r"'model.layers.0.mlp.down_proj.weight' has shape \(64, 96\) but the config "
                       r"needs \(64, 80\)"):
        vj.load_pretrained(llama_dir)


def test_unknown_model_type_is_named(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown model_type 'mamba'"):
        vj.load_pretrained(llama_dir)


def test_truncated_safetensors_names_file(llama_dir):
    f = llama_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(vj.CheckpointError, match=r"model.safetensors: corrupt or truncated"):
        vj.load_pretrained(llama_dir)


def test_corrupt_header_names_file(llama_dir):
    f = llama_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(vj.CheckpointError, match=r"model.safetensors: corrupt or truncated"):
        vj.load_pretrained(llama_dir)


def test_truncated_bin_names_file(tmp_path):
    path = save_bin(build(transformers.LlamaForCausalLM, llama_config(num_hidden_layers=1)),
                    tmp_path / "bin")
    f = path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:2000])
    with pytest.raises(vj.CheckpointError, match=r"pytorch_model.bin: cannot load"):
        vj.load_pretrained(path)


def test_missing_shard_and_missing_files(tmp_path):
    hf = build(transformers.LlamaForCausalLM, llama_config(num_hidden_layers=2))
    path = save(hf, tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(vj.CheckpointError, match=f"names shard files that do not exist.*{victim.name}"):
        vj.load_pretrained(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(vj.CheckpointError, match="config.json: missing"):
        vj.load_pretrained(empty)
    (empty / "config.json").write_text(json.dumps(llama_config().to_dict()))
    with pytest.raises(vj.CheckpointError, match="no weights found"):
        vj.load_pretrained(empty)
    with pytest.raises(vj.CheckpointError, match="not a directory"):
        vj.load_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("top,text", [(False, True), (True, False)])
@pytest.mark.parametrize("family", ["gemma3", "internvl", "llava"])
def test_tied_head_is_read_as_transformers_reads_it(tmp_path, family, top, text):
    """A config whose top-level ``tie_word_embeddings`` disagrees with its text config's loads
    as transformers 5 loads it (Gemma 3, InternVL: the top level decides; LLaVA: tied if either
    is) and gives its logits, whether the file then holds an ``lm_head`` or not."""
    config = {"gemma3": lambda: gemma3_config(gemma3_text_config(sliding_window=7)),
              "internvl": lambda: internvl_config(qwen2_config()), "llava": llava_config}[family]()
    config.text_config.tie_word_embeddings = text
    config.tie_word_embeddings = top
    cls = {"gemma3": transformers.Gemma3ForConditionalGeneration, "llava": LLAVA,
           "internvl": transformers.InternVLForConditionalGeneration}[family]
    path = save(build(cls, config), tmp_path / "hf")
    hf = cls.from_pretrained(str(path), attn_implementation="eager").eval()
    model, params = vj.load_pretrained(path)
    c = model.config
    ids = np.asarray([[5, 6] + [c.image_token_index] * c.num_image_tokens + [7, 8]])
    pixels = np.random.default_rng(0).standard_normal((1, 3, c.input_size, c.input_size)).astype(np.float32)
    extra = {"token_type_ids": torch.tensor(ids == c.image_token_index).long()} if family == "gemma3" else {}
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), **extra).logits
    out = jit_apply(model, {"params": params}, jnp.asarray(ids), jnp.asarray(pixels)).logits
    assert_close(out, t2n(ref), what="logits")
    assert c.text.tie_word_embeddings == (hf.lm_head.weight is hf.get_input_embeddings().weight)


def test_a_tied_config_never_drops_a_differing_lm_head(tmp_path):
    """config.json says tied, but the file's ``lm_head.weight`` is not the embedding: loaded
    untied with a warning naming the tensor (transformers' reading), never replaced by the
    embedding; a file whose head equals its embedding stays tied."""
    config = llava_config(text=llama_config(tie_word_embeddings=False))
    path = save(build(LLAVA, config), tmp_path / "hf")
    d = json.loads((path / "config.json").read_text())
    d["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="lm_head.weight.*differs"):
        model, params = vj.load_pretrained(path)
    assert not model.config.text.tie_word_embeddings and "lm_head" in params["language_model"]


def test_a_repeat_load_traces_no_init_and_keeps_the_read_buffers(llama_dir, monkeypatch):
    """The abstract params of a model are remembered (resolved.param_shapes): a second load of
    the model in the process traces no ``init``, nor does a load in a fresh process (here: the
    in-process memory emptied) with the folder resolved.enable set, the CLIs' default. Each
    safetensors tensor is read into a 64-byte aligned buffer that the CPU device then holds:
    the loaded params are the read bytes, not a second copy."""
    import jax

    from vitsink_jax import resolved
    from vitsink_jax.convert import hf, safetensors_io

    traced, reads = [], {}
    init = hf.init_params
    monkeypatch.setattr(hf, "init_params", lambda *a, **kw: traced.append(1) or init(*a, **kw))
    read = safetensors_io.SafetensorsFile.read

    def recorded(self, key, rows=None):
        out = read(self, key, rows)
        reads[out.ctypes.data] = key
        return out
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", recorded)
    monkeypatch.setattr(resolved, "_SHAPES", {})
    monkeypatch.setitem(resolved._state, "folder", None)
    _, params = vj.load_pretrained(llama_dir)
    vj.load_pretrained(llama_dir)
    assert len(traced) == 1
    resolved.enable(llama_dir.parent / "resolved")
    monkeypatch.setattr(resolved, "_SHAPES", {})
    vj.load_pretrained(llama_dir)
    assert len(traced) == 2 and list((llama_dir.parent / "resolved").glob("shapes-*.json"))
    monkeypatch.setattr(resolved, "_SHAPES", {})
    _, again = vj.load_pretrained(llama_dir)
    assert len(traced) == 2
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
    assert all(p % safetensors_io.HOST_ALIGN == 0 for p in reads)
    norm = params["model"]["norm"]["scale"]  # stored as it is placed: no transpose, no cast
    assert norm.dtype == jnp.float32 and reads.get(norm.unsafe_buffer_pointer()) == "model.norm.weight"
