"""Pod-scale checkpoints: params created on their mesh shards (8 fake devices, and two
jax.distributed processes of 4), equal to the one-device load bitwise; streamed, sharded saves
that transformers loads; Hugging Face repo ids through the huggingface_hub cache."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import vitsink_jax as vj
from conftest import (assert_close, build, clip_vision_config, device_env, llava_config, phi3_config,
                      save, t2n)
from test_lvlm import prompt_with_images

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("sharded_io_worker.py")


@pytest.fixture(scope="module")
def bf16_llava(tmp_path_factory):
    """(HF model in fp32 holding the bf16-rounded weights, its bf16 sharded-safetensors folder);
    the LLM is large enough (128 wide) for fsdp to split its matrices. It is a Phi-3: its fused
    qkv_proj / gate_up_proj tensors are split into row ranges that each device reads, under
    fsdp and tensor parallelism, and fused again by the sharded save (LLaMA's plain tensors
    are the simpler case of the same reads)."""
    text = phi3_config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       vocab_size=256, sliding_window=None)
    hf = build(transformers.LlavaForConditionalGeneration, llava_config(clip_vision_config(), text))
    path = save(hf.to(torch.bfloat16), tmp_path_factory.mktemp("ckpt") / "llava", max_shard_size="60KB")
    return hf.float(), path


def _worker(ckpt, out, *args, env_devices=8):
    env = device_env(env_devices if args[0] == "one" else 0)
    return subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(out), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(next(x for x in out.splitlines() if x.startswith("RESULT"))[7:])


def _hf_logits(hf, ids, pixels):
    with torch.no_grad():
        return t2n(hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits)


def _all_tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_sharded_load_and_streamed_save_on_8_devices(bf16_llava, tmp_path, rng):
    """fsdp=8, fsdp2 x tensor2 (loop and scanned): every device's shard equals the one-device
    load bitwise (bf16 file -> fp32), each device holds its share and no more; the save from the
    sharded params writes several shards + index that transformers loads to the same logits."""
    hf, ckpt = bf16_llava
    assert (ckpt / "model.safetensors.index.json").is_file()
    r = _result(_worker(ckpt, tmp_path, "one"))
    assert r["devices"] == 8
    total = r["total_bytes"]
    for name in ("fsdp8_tensor1_loop", "fsdp2_tensor2_loop", "fsdp2_tensor2_scan"):
        per_device = r[name]
        assert len(per_device) == 8, name
        assert max(per_device.values()) < 0.4 * total, (name, per_device, total)
    # fsdp=8: each byte of a split param lives on exactly one device; only small params repeat
    assert len(set(r["fsdp8_tensor1_loop"].values())) == 1
    (warning,) = r["warnings"]  # the param no dimension of which divides by 8, named once
    assert "odd/kernel[21021, 5]" in warning and "fine/kernel" not in warning
    assert "does not split over mesh axes ('fsdp',)" in r["refused"]
    for saved in ("saved", "saved_scan"):
        out = tmp_path / saved
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(shards) > 2 and set(index["weight_map"].values()) == {f.name for f in shards}
        assert index["metadata"]["total_size"] == sum(a.nbytes for a in _all_tensors(out).values())
        back = transformers.LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
        ids, pixels = prompt_with_images(rng, 1, 16), rng.standard_normal((1, 3, 28, 28)).astype(np.float32)
        assert_close(_hf_logits(back, ids, pixels), _hf_logits(hf, ids, pixels), what=saved)
    assert not list(tmp_path.glob(".saved*tmp-*"))


@pytest.mark.slow
def test_two_processes_load_and_save_like_one(bf16_llava, tmp_path):
    """Two jax.distributed processes x 4 devices, fsdp=8: each process checks its own shards
    against the one-device load; process 0 alone writes, in its own folder, the same files a
    one-process save writes (byte for byte)."""
    _, ckpt = bf16_llava
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_worker(ckpt, tmp_path / f"p{i}", "multi", str(port), str(i)) for i in range(2)]
    one = _worker(ckpt, tmp_path / "one", "one")
    results = [_result(p) for p in procs]
    for r in results:
        assert r["devices"] == 8 and r["local"] == 4 and len(r["fsdp8_tensor1_loop"]) == 4
    _result(one)
    assert not (tmp_path / "p1" / "saved").exists()
    two, single = tmp_path / "p0" / "saved", tmp_path / "one" / "saved"
    assert sorted(f.name for f in two.iterdir()) == sorted(f.name for f in single.iterdir())
    for f in single.iterdir():
        assert (two / f.name).read_bytes() == f.read_bytes(), f.name


def test_sharded_save_replaces_a_single_file_model(bf16_llava, tmp_path):
    """overwrite=True into a folder holding model.safetensors: the shards replace the whole
    folder (a stale single file would shadow them; another file would be another model's)."""
    _, ckpt = bf16_llava
    model, params = vj.load_pretrained(ckpt)
    out = vj.save_pretrained(model, params, tmp_path / "m")
    (out / "notes.txt").write_text("mine")
    vj.save_pretrained(model, params, out, overwrite=True, max_shard_size="100KB")
    names = {f.name for f in out.iterdir()}
    assert "model.safetensors" not in names and "notes.txt" not in names
    assert "model.safetensors.index.json" in names
    back = _all_tensors(out)
    for key, value in _all_tensors(ckpt).items():
        np.testing.assert_array_equal(back[key], value.astype(np.float32), err_msg=key)


def test_truncated_shard_names_the_file(bf16_llava, tmp_path):
    import shutil

    _, ckpt = bf16_llava
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    victim = sorted(bad.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(vj.CheckpointError, match=f"{victim.name}: corrupt or truncated"):
        vj.load_pretrained(bad)


def test_repo_id_resolves_through_the_hub_cache(bf16_llava, tmp_path, monkeypatch):
    """An "org/name" id found in a pre-populated huggingface_hub cache, offline; an id that is
    not there is named in the error."""
    import shutil

    from huggingface_hub import constants

    _, ckpt = bf16_llava
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-llava" / "snapshots" / "0123abcd"
    shutil.copytree(ckpt, snap)
    (cache / "models--tiny-org--tiny-llava" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llava" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, params = vj.load_pretrained("tiny-org/tiny-llava")
    ref = vj.load_pretrained(ckpt)[1]
    np.testing.assert_array_equal(params["language_model"]["lm_head"]["kernel"],
                                  ref["language_model"]["lm_head"]["kernel"])
    assert vj.resolve_model_path("tiny-org/tiny-llava") == snap
    with pytest.raises(vj.CheckpointError, match="tiny-org/absent: neither a folder nor .* cache"):
        vj.load_pretrained("tiny-org/absent")


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [2], "data_offsets": 5},
                                   {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]},
                                   {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}])
def test_malformed_safetensors_header_names_file_and_tensor(tmp_path, entry):
    from vitsink_jax.convert.safetensors_io import SafetensorsFile

    head = json.dumps({"w": entry}).encode()
    f = tmp_path / "model.safetensors"
    f.write_bytes(len(head).to_bytes(8, "little") + head + bytes(16))
    with pytest.raises(vj.CheckpointError, match=r"model.safetensors: corrupt or truncated .*'w'"):
        SafetensorsFile(f)
