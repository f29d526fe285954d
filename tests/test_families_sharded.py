"""The off-the-shelf LVLM families on a mesh: Gemma 3, InternVL and Qwen2.5-VL loaded over 8 fake
devices (fsdp=2 x tensor=2, loop and scanned layers) give the one-device logits, with the
attention projections split the Megatron way. One fresh process for all (the device count is
fixed at jax import)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers

from conftest import IMAGE_TOKEN, build, device_env, gemma3_config, internvl_config, qwen2_5_vl_config, save

MESH_CHECK = """
import json, sys
import jax, numpy as np
import vitsink_jax as vj
from vitsink_jax import parallel
out = {}
for ckpt, batch in zip(sys.argv[1::2], sys.argv[2::2]):
    ids, pixels = (np.load(batch)[k] for k in ("ids", "pixels"))
    model, ref = vj.load_pretrained(ckpt)
    want = np.asarray(model.apply({"params": ref}, ids, pixels).logits)
    for scan in (False, True):
        mesh = parallel.make_mesh(2, tensor=2)  # every param split where it divides (min_size=1)
        tree = vj.stack_layers(ref) if scan else ref
        m, p = vj.load_pretrained(ckpt, scan_layers=scan,
                                  shardings=parallel.param_shardings(tree, mesh, min_size=1))
        got = jax.jit(lambda p, i, x: m.apply({"params": p}, i, x).logits)(p, ids, pixels)
        layer = p["language_model"]["model"]["layers" if scan else "layers_0"]["self_attn"]
        out[f"{type(m).__name__} scan={scan}"] = {
            "diff": float(np.abs(np.asarray(got) - want).max()),
            "q": str(layer["q_proj"]["kernel"].sharding.spec), "o": str(layer["o_proj"]["kernel"].sharding.spec),
            "tower": sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(p["vision_tower"])})}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_gemma3_internvl_and_qwen2_5_vl_run_sharded_on_8_devices(tmp_path):
    """(~40 s: one fresh process loading the three families four times.) Qwen2.5-VL runs on a
    16 x 24 image (2 x 3 visual tokens), not its fixed-size square."""
    args = []
    for name, cls, cfg, n_img, size in (
            ("gemma3", transformers.Gemma3ForConditionalGeneration, gemma3_config(), 4, (28, 28)),
            ("internvl", transformers.InternVLForConditionalGeneration, internvl_config(), 4, (28, 28)),
            ("qwen2_5_vl", transformers.Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config(), 6, (16, 24))):
        folder = save(build(cls, cfg), tmp_path / name)
        rng = np.random.default_rng(0)
        ids = np.concatenate([rng.integers(3, 90, (2, 3)), np.full((2, n_img), IMAGE_TOKEN),
                              rng.integers(3, 90, (2, 4))], 1)
        np.savez(tmp_path / f"{name}.npz", ids=ids, pixels=rng.standard_normal((2, 3, *size)).astype(np.float32))
        args += [str(folder), str(tmp_path / f"{name}.npz")]
    env = device_env(8)
    proc = subprocess.run([sys.executable, "-c", MESH_CHECK, *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[7:])
    assert len(out) == 6
    for name, r in out.items():
        assert r["diff"] < 1e-4, (name, r)
        # q_proj [.., D, H*hd]: heads over "tensor" (column parallel); o_proj: its input rows
        assert "tensor" in r["q"].split(",")[-1] and "tensor" in r["o"].split(",")[-2], (name, r)
        assert any("tensor" in spec for spec in r["tower"]), (name, r)  # the tower is split too
