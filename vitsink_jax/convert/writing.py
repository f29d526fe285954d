"""Writing a Hugging Face model folder, streamed, from params on one device or over many hosts.

Tensors are gathered one at a time (all processes take part in the gather of a multi-host
array), transposed to HF's layout and written by process 0 into ``model.safetensors`` or, above
``max_shard_size``, ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(transformers' names), inside a temporary folder moved in at the end (for a ``gs://`` folder a
local temporary folder, its files uploaded at the end). A writer holds one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional, Union

import jax
import numpy as np
from flax import traverse_util

from .. import paths
from ..atomic import replace_folder, write_error
from ..progress import progress as progress_bar
from . import processor
from .folders import PROGRESS_MIN_TENSORS, SAFE_INDEX, SAFE_SINGLE, weight_files
from .hf import export_key, fused_key, fused_tensors, hf_shape, path_to_hf_key, to_hf_perm
from .load_plan import decoder_prefixes
from .safetensors_io import write_stream

_ARCHITECTURES = {"clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel",
                  "internvl_vision": "InternVLVisionModel",
                  "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "llava": "LlavaForConditionalGeneration"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(size: Union[int, str]) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"500MiB"`` -> 500 * 2**20 (transformers' spelling), ints as is."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if m is None:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or '500MiB'")
    return int(float(m[1]) * _SIZE_UNITS[m[2] or ""])


def hf_tensors(params: dict) -> list:
    """Our params (loop or scanned layout, any sharding) -> [(canonical HF key, param, layer
    index or None, loop-layout path)] sorted by key; nothing is copied."""
    flat = traverse_util.flatten_dict(params)
    decoders = decoder_prefixes(flat)
    out = []
    for p, x in flat.items():
        d = next((d for d in decoders if p[:len(d) + 1] == d + ("layers",)), None)
        if d is None:
            out.append((path_to_hf_key(p), x, None, p))
        else:
            for i in range(x.shape[0]):
                loop = d + (f"layers_{i}",) + p[len(d) + 1:]
                out.append((path_to_hf_key(loop), x, i, loop))
    return sorted(out, key=lambda t: t[0])


def fuse_groups(tensors: list, fused: tuple) -> list:
    """:func:`hf_tensors`' entries -> [(HF key, [(param, layer, path) per part])] sorted by key:
    the parts of a fused tensor (:func:`~vitsink_jax.convert.hf.fused_tensors`) under its key
    in row order, every other tensor alone."""
    groups = {}
    for key, x, layer, p in tensors:
        fuse = fused_key(key, fused)
        name, i = fuse if fuse else (key, 0)
        groups.setdefault(name, []).append((i, (x, layer, p)))
    return [(k, [part for _, part in sorted(g, key=lambda e: e[0])]) for k, g in sorted(groups.items())]


def _image_row_keys(config) -> set:
    """The HF keys that get one more vocabulary row on save: those of the embedding and the LM
    head of a LLaVA whose image id is one past its vocabulary (a LLaVA-codebase or TinyLLaVA
    import). transformers' Llava embeds every input id, so the export adds an ``<image>`` row
    (the mean of the others, as transformers' own LLaVA conversion does) at that id; the logits
    over the original vocabulary are unchanged and gain one column."""
    text = getattr(config, "text", None)
    if text is None or config.image_token_index != text.vocab_size:
        return set()
    return {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
            "language_model.lm_head.bias"}


def _gather(x, layer: Optional[int]) -> np.ndarray:
    """One tensor (one layer of a stack) whole on this host; with several processes every
    process must call this in the same order (it is a collective)."""
    if layer is not None:
        x = x[layer]
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    # assembled from the shards: np.asarray(x) would keep a host copy cached on the param
    # itself, so a save would leave the whole model in host memory
    out = np.empty(x.shape, x.dtype)
    for shard in x.addressable_shards:
        if shard.replica_id == 0:
            out[shard.index] = np.asarray(shard.data)
    return out


def _hf_layout(path: tuple, a: np.ndarray) -> np.ndarray:
    perm = to_hf_perm(path, a.ndim)
    return np.ascontiguousarray(a.transpose(perm) if perm else a)


def shard_layout(entries: list, max_bytes: int) -> list:
    """Entries (key, dtype, HF shape, bytes) grouped into files of at most ``max_bytes`` (a
    larger tensor gets a file alone), in order, as transformers shards."""
    files, size = [[]], 0
    for e in entries:
        n = e[3]
        if files[-1] and size + n > max_bytes:
            files.append([])
            size = 0
        files[-1].append(e)
        size += n
    return files



def shard_names(n: int) -> list:
    """The file names of ``n`` shards, as transformers names them (one file: ``model.safetensors``)."""
    return [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _refuse_existing(out_dir, overwrite: bool, writer: bool, collective: bool) -> None:
    """Raises FileExistsError for a non-empty ``out_dir`` unless ``overwrite``. The writer's disk
    decides, for every process (none may wait in a gather)."""
    from .. import parallel

    refusal = (f"{out_dir}: not empty; pass overwrite=True to replace the model there"
               if writer and out_dir.exists() and any(out_dir.iterdir()) and not overwrite else None)
    if collective:
        refusal = parallel.allgather_objects(refusal)[0]
    if refusal:
        raise FileExistsError(refusal)


def _entries(groups: list, config, grow: set, dtype) -> list:
    """:func:`fuse_groups`' entries -> [(exported HF key, dtype written, HF shape, bytes)]: a
    fused tensor's parts stacked on HF's first axis, a key in ``grow`` one row longer."""
    entries = []
    for key, parts in groups:
        dt = np.dtype(dtype or parts[0][0].dtype)
        shapes = [hf_shape(p, tuple(x.shape[1:] if layer is not None else x.shape))
                  for x, layer, p in parts]
        shape = (sum(s[0] for s in shapes) + (key in grow),) + shapes[0][1:]
        entries.append((export_key(config, key), dt, shape,
                        int(np.prod(shape, dtype=np.int64)) * dt.itemsize))
    return entries


def _hf_config(config, grow: set, dtype, out_dir) -> dict:
    """The ``config.json`` of the export: ``config.to_hf()`` with the vocabulary grown by the
    ``<image>`` row (``grow``), the architecture transformers loads and the ``dtype`` written."""
    if getattr(config, "lm_head_bias", False):
        warnings.warn(f"{out_dir}: the LM head has a bias (a TinyLLaVA Phi-2): vitsink_jax loads it "
                      "back, transformers' Llava has no LM-head bias and ignores "
                      "language_model.lm_head.bias", stacklevel=3)
    hf_cfg = config.to_hf()
    if grow:
        hf_cfg["text_config"]["vocab_size"] += 1
    if "architectures" not in hf_cfg:  # (an LVLM config writes its own)
        hf_cfg["architectures"] = [_ARCHITECTURES[hf_cfg["model_type"]]]
    hf_cfg["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        str(dtype), "float32")
    return hf_cfg


def _hf_arrays(groups: Iterator, n: int, dtype, grow: set, bar) -> Iterator[np.ndarray]:
    """The next ``n`` of :func:`fuse_groups`' entries (an iterator) gathered whole, each in HF's
    layout and ``dtype`` (or its own): a fused tensor's parts concatenated, a key in ``grow``
    with the ``<image>`` row appended (the mean of the vocabulary's rows)."""
    for _ in range(n):
        key, parts = next(groups)
        a = [_hf_layout(p, _gather(x, layer).astype(dtype or x.dtype, copy=False)) for x, layer, p in parts]
        if key in grow:
            a.append(a[0].mean(0, keepdims=True, dtype=np.float32).astype(a[0].dtype))
        bar.update(1)
        yield a[0] if len(a) == 1 else np.concatenate(a)


def _write_shards(groups: list, names: list, files: list, tmp: Optional[Path], dtype, grow: set,
                  bar) -> Optional[OSError]:
    """Gathers every tensor, file by file (:func:`shard_layout`'s ``files``, named ``names``),
    and where ``tmp`` is a folder (the writer's) streams each file into it. Every process runs
    every gather; a write error is returned, not raised, once the gathers are done, so no other
    process is left waiting in one."""
    it, failure = iter(groups), None
    for name, group in zip(names, files):
        stream = _hf_arrays(it, len(group), dtype, grow, bar)
        if tmp is not None and failure is None:
            try:
                write_stream(tmp / name, [e[:3] for e in group], stream, {"format": "pt"})
            except OSError as e:
                failure = e
        for _ in stream:  # the rest of the gathers (all of them on other processes)
            pass
    return failure


def _write_metadata(tmp: Path, names: list, files: list, hf_cfg: dict, image_processor) -> None:
    """The shard index (several files), ``config.json`` and the image processor's file (a reload
    preprocesses as this model did) into ``tmp``."""
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(e[3] for g in files for e in g)},
                 "weight_map": {e[0]: n for n, g in zip(names, files) for e in g}}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    if image_processor is not None:
        (tmp / processor.FILE).write_text(json.dumps(image_processor, indent=2, sort_keys=True) + "\n")


def save_pretrained(model, params: dict, out_dir, overwrite: bool = False,
                    max_shard_size: Union[int, str] = "5GB", dtype=None,
                    progress: Optional[bool] = None) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` (or shards of at most ``max_shard_size`` +
    ``model.safetensors.index.json``) in the layout transformers loads, from params in either
    layer layout, on one device or sharded over several hosts.

    Streamed: one tensor at a time is gathered. Params spread over several processes make this a
    collective (every process calls it, process 0 writes, the others wait); params this process
    holds whole are written by the caller alone.
    Atomic: everything is written into a temporary folder beside ``out_dir`` first, then moved
    in with the modes the umask gives (readable by others where it allows). For an object store
    (``gs://``) the temporary folder is local and its files are uploaded into ``out_dir``: each
    file appears whole, the folder not as one (see :mod:`vitsink_jax.paths`). An existing non-empty
    ``out_dir`` is refused unless ``overwrite=True``; then the whole folder is replaced
    (:func:`vitsink_jax.atomic.replace_folder`): no file of the model there stays, e.g. a
    tokenizer file that would not match the new vocabulary. A write error (a full disk) leaves
    an earlier model there untouched, removes the temporary folder and is raised as an OSError
    naming ``out_dir`` with the original errno.
    """
    from .. import parallel

    out_dir = paths.path(out_dir)
    collective = parallel.is_global(params)
    writer = jax.process_index() == 0 or not collective
    _refuse_existing(out_dir, overwrite, writer, collective)
    groups = fuse_groups(hf_tensors(params), fused_tensors(model.config))
    grow = _image_row_keys(model.config)
    entries = _entries(groups, model.config, grow, dtype)
    files = shard_layout(entries, parse_size(max_shard_size))
    names = shard_names(len(files))
    hf_cfg = _hf_config(model.config, grow, entries[0][1], out_dir)
    image_processor = processor.processor_file_of(model.config)
    tmp = None
    if writer:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-",
                                    dir=None if paths.is_remote(out_dir) else out_dir.parent))
    show = progress if progress is not None else len(entries) >= PROGRESS_MIN_TENSORS
    try:
        with progress_bar(total=len(entries), desc=f"saving {out_dir.name}", unit="tensor",
                          disable=not show or not writer) as bar:
            failure = _write_shards(groups, names, files, tmp, dtype, grow, bar)
        if collective:
            parallel.sync("save_pretrained gathered")
        if failure is not None:
            raise failure
        if writer:
            _write_metadata(tmp, names, files, hf_cfg, image_processor)
            replace_folder(tmp, out_dir)
    except OSError as e:
        raise write_error(out_dir, e) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if collective:
        parallel.sync("save_pretrained written")  # the same name on every process
    return out_dir


def checkpoint_hash(path) -> str:
    """sha256 over config.json and the weight files of a checkpoint folder (provenance records)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in [path / "config.json"] + weight_files(path):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
