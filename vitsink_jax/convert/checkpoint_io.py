"""Reading and writing Hugging Face model folders, from one device up to a pod slice.

Loading builds a *plan* from the files' headers alone (which file and key feeds each param, its
shape, whether it is a linear kernel to transpose, and for scanned layers the L per-layer keys
stacked into it), checks it against the model (missing / unexpected tensors, shapes), then
creates every param as a global ``jax.Array`` with its sharding: each process reads only the row
range of each tensor that its own devices hold (plain positioned reads, no memory map), casts it
per device slice and hands it to ``jax.make_array_from_callback``. Without a mesh the sharding is
the default device, which is the single-device load.

Saving streams: tensors are gathered one at a time (all processes take part in the gather of a
multi-host array), transposed to HF's layout and written by process 0 into
``model.safetensors`` or, above ``max_shard_size``, ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (transformers' names), inside a temporary folder moved in at
the end (for a ``gs://`` folder a local temporary folder, its files uploaded at the end). A
writer holds one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .. import paths
from ..atomic import replace_folder, write_error
from ..config import ModelConfig, config_from_hf
from .. import resolved
from ..progress import progress as progress_bar
from . import processor
from .hf import (abstract_params, build_model, canonical_key, export_key, fused_key, fused_tensors,
                 hf_key_to_path, hf_shape, ignored_patterns, path_to_hf_key, split_key, to_hf_perm)
from .safetensors_io import (HOST_ALIGN, CheckpointError, SafetensorsFile, TensorInfo, aligned_empty,
                             write_stream)

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
PROGRESS_MIN_TENSORS = 200  # auto progress bar above this many tensors
HUB_FILES = ["config.json", "*.safetensors", "*.json", "*.model", "*.txt", "*.bin"]


# ---------------------------------------------------------------------------------------------
# Where a model lives: a folder, or a Hugging Face repo id in the huggingface_hub cache
# ---------------------------------------------------------------------------------------------

def resolve_model_path(path_or_id) -> Path:
    """A model folder, or the snapshot folder of a Hugging Face repo id (``"org/name"``) in the
    huggingface_hub cache. Offline (``HF_HUB_OFFLINE=1``) only the cache is looked at; otherwise
    a repo missing there is downloaded (weights, config, tokenizer files). A string that is
    neither raises :class:`CheckpointError` naming it. A ``gs://`` folder is read from a local
    copy (:func:`vitsink_jax.paths.local_copy`)."""
    if paths.is_remote(path_or_id):
        return paths.local_copy(path_or_id)
    path = Path(path_or_id)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_id)):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_id), local_files_only=True))
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(f"{path_or_id}: neither a folder nor a Hugging Face repo id in the "
                                  f"huggingface_hub cache ({constants.HF_HUB_CACHE}); offline "
                                  f"(HF_HUB_OFFLINE=1), so nothing is downloaded") from e
    try:
        return Path(snapshot_download(str(path_or_id), allow_patterns=HUB_FILES))
    except Exception as e:  # no network, no such repo, no access: the hub's own error types
        raise CheckpointError(f"{path_or_id}: neither a folder nor a Hugging Face repo id that "
                              f"could be fetched ({type(e).__name__}: {e})") from e


def read_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model folder)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing (a Hugging Face model folder needs config.json)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from e


def weight_files(path: Path) -> list:
    """The weight files of a checkpoint folder, in the order transformers prefers."""
    for single, index in ((SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path / index}: unreadable shard index ({e!r})") from e
            files = [path / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path / index} names shard files that do not exist: {missing}")
            return files
    raise CheckpointError(f"{path}: no weights found (looked for {SAFE_SINGLE}, {SAFE_INDEX}, "
                          f"{BIN_SINGLE}, {BIN_INDEX})")


class BinFile:
    """A ``pytorch_model*.bin`` file, read whole with ``torch.load(weights_only=True)`` (the
    format has no header to read ranges from); the interface of
    :class:`~vitsink_jax.convert.safetensors_io.SafetensorsFile`."""

    def __init__(self, path: Path):
        import ml_dtypes
        import torch  # only this path needs torch

        self.path = path
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load PyTorch checkpoint with weights_only=True "
                                  f"(corrupt, truncated or not a plain state dict): {e}") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
        bf16 = lambda t: t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)  # noqa: E731
        self.arrays = {k: bf16(t) if t.dtype == torch.bfloat16 else t.numpy() for k, t in state.items()}
        self.tensors = {k: TensorInfo(a.dtype, a.shape, 0, a.nbytes) for k, a in self.arrays.items()}

    def keys(self) -> list:
        return list(self.arrays)

    def read(self, key: str, rows: Optional[slice] = None) -> np.ndarray:
        a = self.arrays[key]
        return a if rows is None else a[rows]


def open_weights(path: Path, warn: bool = True) -> list:
    """Readers (header parsed, nothing else read) for every weight file of a folder. ``.bin``
    files are read whole, with a warning naming the file when ``warn``."""
    readers = []
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            readers.append(SafetensorsFile(f))
        else:
            if warn:
                warnings.warn(f"{f}: PyTorch .bin checkpoints are read whole into this host's memory "
                              "(safetensors files are read in byte ranges per device); save the "
                              "model as safetensors for sharded loading", stacklevel=4)
            readers.append(BinFile(f))
    return readers


# ---------------------------------------------------------------------------------------------
# The load plan: which tensor(s) feed each param
# ---------------------------------------------------------------------------------------------

def _limited(items: list, n: int = 20) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def decoder_prefixes(paths) -> set:
    """Param-path prefixes of the decoders (the dicts holding ``embed_tokens``): their
    ``layers_i`` / ``layers`` children are the LLM layers that scanned layouts stack."""
    return {p[:p.index("embed_tokens")] for p in paths if "embed_tokens" in p}


def layer_split(path: tuple, decoders: set) -> tuple:
    """Loop-layout path -> (scanned path, layer index), or (path, None) outside decoder layers."""
    for d in decoders:
        if path[:len(d)] == d and len(path) > len(d):
            m = re.fullmatch(r"layers_(\d+)", path[len(d)])
            if m:
                return path[:len(d)] + ("layers",) + path[len(d) + 1:], int(m[1])
    return path, None


class Planned:
    """One param of the plan: its shape in our layout, the (reader, key, first row) per source
    tensor (one, or L for a scanned layer stack; the row is HF's first axis, 0 unless the tensor
    is fused: :func:`~vitsink_jax.convert.hf.fused_tensors`) and the transpose from HF's layout
    (None: as stored)."""

    __slots__ = ("shape", "sources", "stacked", "perm")

    def __init__(self, shape, sources, stacked, perm):
        self.shape, self.sources, self.stacked, self.perm = shape, sources, stacked, perm


def load_plan(path: Path, config: ModelConfig, model, readers: list) -> dict:
    """{param path of ``model`` (loop or scanned layout): Planned}, from the headers alone.

    Raises CheckpointError listing missing / unexpected tensors, or naming a tensor whose shape
    disagrees with the config (both shapes given)."""
    scanned = getattr(model, "scan_layers", False)
    loop = model.clone(scan_layers=False) if scanned else model
    targets = abstract_params(loop)
    original_type = read_config(path).get("model_type", "")
    ignored = [re.compile(p) for p in ignored_patterns(config, original_type)]
    fused = fused_tensors(config)
    found, unexpected = {}, []
    for reader in readers:
        for key in reader.keys():
            canon = canonical_key(config, key)
            parts = split_key(canon, fused)
            if parts is not None:
                split = _split_sources(reader, key, parts, targets)
                if split is None:
                    unexpected.append(key)
                found.update(split or {})
                continue
            target = hf_key_to_path(canon, targets)
            if target is None:
                if not any(p.search(canon) for p in ignored):
                    unexpected.append(key)
                continue
            info, want = reader.tensors[key], tuple(targets[target].shape)
            perm = to_hf_perm(target, len(info.shape))
            ours = tuple(info.shape[i] for i in np.argsort(perm)) if perm else tuple(info.shape)
            if ours != want:
                raise CheckpointError(f"{reader.path}: tensor {key!r} has shape {tuple(info.shape)} "
                                      f"but the config needs {hf_shape(target, want)} (param "
                                      f"{'/'.join(target)})")
            found[target] = (reader, key, perm, 0)
    missing = ["/".join(p) + f" (HF {path_to_hf_key(p)})" for p in targets if p not in found]
    if missing or unexpected:
        msg = [f"{path}: checkpoint does not match the {config.__class__.__name__} built from config.json"]
        if missing:
            msg.append(f"missing tensors ({len(missing)}): {_limited(missing)}")
        if unexpected:
            msg.append(f"unexpected tensors ({len(unexpected)}): {_limited(unexpected)}")
        raise CheckpointError("; ".join(msg))
    decoders = decoder_prefixes(targets) if scanned else set()
    plan = {}
    for target in targets:  # model order; a scanned stack collects its layers in index order
        reader, key, perm, row = found[target]
        dest, layer = layer_split(target, decoders)
        if layer is None:
            plan[dest] = Planned(tuple(targets[target].shape), [(reader, key, row)], False, perm)
        else:
            entry = plan.setdefault(dest, Planned(None, [], True, perm))
            entry.sources.append((layer, reader, key, row))
            entry.shape = (len(entry.sources),) + tuple(targets[target].shape)
    for entry in plan.values():
        if entry.stacked:
            entry.sources = [s[1:] for s in sorted(entry.sources, key=lambda s: s[0])]
    return plan


def _split_sources(reader, key: str, parts: tuple, targets: dict) -> Optional[dict]:
    """{param path: (reader, key, transpose, first row)} for the parts (canonical keys, in row
    order) of the fused tensor ``key``, or None when the model has no such params. Raises
    CheckpointError when the parts' shapes do not stack to the tensor's."""
    paths = [hf_key_to_path(p, targets) for p in parts]
    if None in paths:
        return None
    shape = tuple(reader.tensors[key].shape)
    hf = [hf_shape(p, tuple(targets[p].shape)) for p in paths]
    if sum(h[0] for h in hf) != shape[0] or any(h[1:] != shape[1:] for h in hf):
        raise CheckpointError(f"{reader.path}: fused tensor {key!r} has shape {shape} but the config "
                              f"needs {', '.join(parts)} of shapes {hf} stacked on its first axis")
    rows = np.cumsum([0] + [h[0] for h in hf])
    return {p: (reader, key, to_hf_perm(p, len(h)), int(r)) for p, h, r in zip(paths, hf, rows)}


# ---------------------------------------------------------------------------------------------
# Materialising the plan on devices
# ---------------------------------------------------------------------------------------------

def _bounds(index: tuple, shape: tuple) -> tuple:
    """A device's index (tuple of slices) -> ((start, stop), ...) per dimension."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _read_box(reader, key: str, row: int, perm, box: tuple) -> np.ndarray:
    """The part ``box`` ((start, stop) per dim, our layout) of one source tensor whose rows
    start at HF row ``row``, in our layout, in the file's dtype: HF's first axis restricted while
    reading, the rest sliced after."""
    lead = perm[0] if perm else 0  # our dim that is HF's row axis
    rows = slice(row + box[lead][0], row + box[lead][1]) if box else None
    hf = reader.read(key, rows)
    ours = hf.transpose(np.argsort(perm)) if perm else hf
    return ours[tuple(slice(None) if d == lead else slice(*b) for d, b in enumerate(box))]


def _read_block(entry: Planned, box: tuple) -> np.ndarray:
    """The part ``box`` ((start, stop) per dim) of a planned param, in the file's dtype."""
    if entry.stacked:
        layers = entry.sources[box[0][0]:box[0][1]]
        return np.stack([_read_box(*source, entry.perm, box[1:]) for source in layers])
    return _read_box(*entry.sources[0], entry.perm, box)


def host_array(x: np.ndarray, dtype, fresh: bool) -> np.ndarray:
    """``x`` as ``dtype`` in a C-contiguous :data:`~vitsink_jax.convert.safetensors_io.HOST_ALIGN`
    aligned host buffer, which jax.device_put on a CPU aliases instead of copying: ``x`` itself
    when it is one and ``fresh`` (a buffer no other array uses: a safetensors read, handed to
    one device), else a cast / copy into a new one."""
    if fresh and x.dtype == np.dtype(dtype) and x.flags.c_contiguous and not x.ctypes.data % HOST_ALIGN:
        return x
    out = aligned_empty(x.shape, dtype)
    np.copyto(out, x, casting="unsafe")
    return out


def materialize(entry: Planned, sharding, dtype) -> jax.Array:
    """One planned param as a global array placed by ``sharding``: this process reads the
    bounding box of the slices its devices hold (once), and each device gets its slice cast to
    ``dtype``, read straight into the buffer it keeps where it can (:func:`host_array`: a CPU
    device aliases a fresh aligned read; a slice a second device also holds is copied, so no
    two device buffers share memory). ``sharding=None``: the whole param on the default
    device, uncommitted (as ``jnp.asarray`` places it, so it can still be replicated over a
    multi-host mesh)."""
    shape = entry.shape
    fresh = not entry.stacked and isinstance(entry.sources[0][0], SafetensorsFile)
    if sharding is None:
        return jax.device_put(host_array(_read_block(entry, tuple((0, n) for n in shape)), dtype, fresh))
    local = {d: _bounds(i, shape) for d, i in sharding.addressable_devices_indices_map(shape).items()}
    box = tuple((min(b[k][0] for b in local.values()), max(b[k][1] for b in local.values()))
                for k in range(len(shape))) if local else tuple((0, 0) for _ in shape)
    block = _read_block(entry, box)
    handed = set()

    def shard(index):
        bounds = _bounds(index, shape)
        rel = tuple(slice(a - b[0], z - b[0]) for (a, z), b in zip(bounds, box))
        out = host_array(block[rel], dtype, fresh and bounds not in handed)
        handed.add(bounds)
        return out

    return jax.make_array_from_callback(shape, sharding, shard)


def _check_divisible(path: tuple, shape: tuple, sharding) -> None:
    spec = getattr(sharding, "spec", None)
    if spec is None:  # one device, or a sharding kind without a mesh spec
        return
    for dim, axes in enumerate(spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        n = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
        if dim < len(shape) and shape[dim] % n:
            raise CheckpointError(f"param {'/'.join(path)}: dimension {dim} of shape {shape} does "
                                  f"not split over mesh axes {axes} ({n} devices)")


def plan_shardings(plan: dict, mesh=None, shardings=None) -> dict:
    """{param path: sharding}: ``shardings`` (a tree like the params) when given, else
    :func:`~vitsink_jax.parallel.param_shardings` over ``mesh``, else None (the default device). A mesh
    whose fsdp axis divides no free dimension of a large param leaves it unsplit there, said
    once in a warning."""
    from .. import parallel

    if shardings is not None:
        flat = traverse_util.flatten_dict(shardings)
        missing = [p for p in plan if p not in flat]
        if missing:
            raise CheckpointError(f"shardings has no entry for {_limited(['/'.join(p) for p in missing])}")
        return {p: flat[p] for p in plan}
    if mesh is None:
        return {p: None for p in plan}
    shapes = traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(e.shape, jnp.float32)
                                           for p, e in plan.items()})
    out = traverse_util.flatten_dict(parallel.param_shardings(shapes, mesh))
    if mesh.shape["fsdp"] > 1:
        whole = ["/".join(p) + str(list(plan[p].shape)) for p, s in out.items()
                 if "fsdp" not in s.spec and np.prod(plan[p].shape) >= parallel.MIN_SPLIT_SIZE]
        if whole:
            warnings.warn(f"{len(whole)} large param(s) are not split over fsdp (no free dimension "
                          f"divides by {mesh.shape['fsdp']}): {_limited(whole, 5)}", stacklevel=4)
    return out


def untie_differing_head(path: Path, config: ModelConfig, readers: list) -> ModelConfig:
    """``config`` with its LM head untied when config.json ties it but the checkpoint holds an
    ``lm_head.weight`` [vocab, hidden] other than the embedding, as transformers 5 loads such a
    file (with a warning naming both tensors) -- the head is never dropped for the embedding."""
    from ..config import LlavaConfig, TextConfig, _tied

    text = config.text if isinstance(config, LlavaConfig) else config
    if not isinstance(text, TextConfig) or not text.tie_word_embeddings:
        return config
    found = {}
    for reader in readers:
        for key in reader.keys():
            m = re.search(r"(^|\.)(lm_head|model\.embed_tokens)\.weight$", canonical_key(config, key))
            if m:
                found[m[2]] = (reader, key)
    if "lm_head" not in found or "model.embed_tokens" not in found:
        return config
    (hr, head), (er, embed) = found["lm_head"], found["model.embed_tokens"]
    if np.array_equal(hr.read(head), er.read(embed)):
        return config
    warnings.warn(f"{path}: config.json ties the LM head to the embedding (tie_word_embeddings), but "
                  f"the checkpoint's {head!r} differs from {embed!r}: loaded untied, as transformers "
                  "does; set tie_word_embeddings false in config.json to silence this", stacklevel=3)
    untied = _tied(text, False)
    return dataclasses.replace(config, text=untied) if isinstance(config, LlavaConfig) else untied


def load_params(path: Path, config: ModelConfig, model, dtype=jnp.float32, mesh=None,
                shardings=None, param_dtypes: Optional[Callable] = None,
                progress: Optional[bool] = None, readers: Optional[list] = None) -> dict:
    """The params of ``model`` (loop or scanned layout) read from the folder ``path`` (or from
    ``readers``, e.g. a foreign layout's renamed ones), each placed as :func:`plan_shardings`
    says and cast to ``dtype`` (or ``param_dtypes(path tuple)``)."""
    readers = open_weights(path) if readers is None else readers
    plan = load_plan(path, config, model, readers)
    placement = plan_shardings(plan, mesh, shardings)
    n = sum(len(e.sources) for e in plan.values())
    show = progress if progress is not None else n >= PROGRESS_MIN_TENSORS
    flat = {}
    with progress_bar(total=n, desc=f"loading {path.name}", unit="tensor",
              disable=not show or jax.process_index() != 0) as bar:
        for p, entry in plan.items():
            _check_divisible(p, entry.shape, placement[p])
            flat[p] = materialize(entry, placement[p], param_dtypes(p) if param_dtypes else dtype)
            bar.update(len(entry.sources))
    return traverse_util.unflatten_dict(flat)


def load_pretrained(path, dtype=jnp.float32, param_dtype=None, progress: Optional[bool] = None,
                    mesh=None, shardings=None, param_dtypes: Optional[Callable] = None,
                    vision_tower=None, **options):
    """Loads a Hugging Face model folder or repo id. Returns (flax module, params).

    ``dtype`` is the compute dtype and, unless ``param_dtype`` is given, the dtype params are cast
    to (fp16/bf16 checkpoints are upcast or kept as asked); ``param_dtypes(path tuple) -> dtype``
    casts param by param instead (e.g. trainable parts float32, frozen ones bf16). ``options``
    are module fields (see :func:`~vitsink_jax.convert.hf.build_model`); with
    ``scan_layers=True`` the params come in the scanned layout, stacked while reading.

    With ``mesh`` (or explicit ``shardings``, a tree like the params) every param is created
    directly on its shards (:func:`~vitsink_jax.parallel.param_shardings`): each process reads
    only the rows its devices hold, nothing is whole on one device or in one host's memory.
    Without, params land on the default device.

    ``path``: a folder or a repo id (see :func:`resolve_model_path`). Dispatch on config.json's
    model_type: llava, gemma3, internvl -> LVLM; clip / clip_vision_model / siglip /
    siglip_vision_model / dinov2 / dinov2_with_registers / internvl_vision -> vision tower;
    llama / qwen2 / phi / phi3 / gemma3_text -> LLM. Unknown types raise CheckpointError naming
    the type and the supported ones.
    Checkpoints of the original LLaVA codebase (``mm_vision_tower`` in config.json) and of
    TinyLLaVA Factory (model_type tinyllava) load into the same LLaVA
    (:mod:`vitsink_jax.convert.layouts`); ``vision_tower`` overrides the folder a LLaVA-codebase
    tower is read from.
    """
    from . import layouts

    path = resolve_model_path(path)
    raw = read_config(path)
    readers = None
    if layouts.detect(raw) is not None:
        raw, readers = layouts.open_layout(path, raw, open_weights, vision_tower)
    elif vision_tower is not None:
        raise ValueError(f"{path}: vision_tower= is for checkpoints that keep their vision tower in "
                         "another folder (the LLaVA codebase's mm_vision_tower)")
    try:
        config = resolved.config(raw, config_from_hf)
    except ValueError as e:  # a model_type or setting we do not run: the user's checkpoint
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    config = processor.read_processing(path, config)
    readers = open_weights(path) if readers is None else readers
    config = untie_differing_head(path, config, readers)
    model = build_model(config, dtype, param_dtype, **options)
    params = load_params(path, config, model, param_dtype or dtype, mesh, shardings, param_dtypes,
                         progress, readers)
    return model, params


# ---------------------------------------------------------------------------------------------
# Writing checkpoints
# ---------------------------------------------------------------------------------------------

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
    remote = paths.is_remote(out_dir)
    collective = parallel.is_global(params)
    writer = jax.process_index() == 0 or not collective
    refusal = (f"{out_dir}: not empty; pass overwrite=True to replace the model there"
               if writer and out_dir.exists() and any(out_dir.iterdir()) and not overwrite else None)
    if collective:  # the writer's disk decides, for every process (none may wait in a gather)
        refusal = parallel.allgather_objects(refusal)[0]
    if refusal:
        raise FileExistsError(refusal)
    tensors = fuse_groups(hf_tensors(params), fused_tensors(model.config))
    grow = _image_row_keys(model.config)
    entries = []  # (HF key, dtype written, HF shape, bytes)
    for key, parts in tensors:
        dt = np.dtype(dtype or parts[0][0].dtype)
        shapes = [hf_shape(p, tuple(x.shape[1:] if layer is not None else x.shape))
                  for x, layer, p in parts]
        shape = (sum(s[0] for s in shapes) + (key in grow),) + shapes[0][1:]
        entries.append((export_key(model.config, key), dt, shape,
                        int(np.prod(shape, dtype=np.int64)) * dt.itemsize))
    files = shard_layout(entries, parse_size(max_shard_size))
    names = [SAFE_SINGLE] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    config = model.config
    if getattr(config, "lm_head_bias", False):
        warnings.warn(f"{out_dir}: the LM head has a bias (a TinyLLaVA Phi-2): vitsink_jax loads it "
                      "back, transformers' Llava has no LM-head bias and ignores "
                      "language_model.lm_head.bias", stacklevel=2)
    hf_cfg = config.to_hf()
    image_processor = processor.processor_file_of(config)
    if grow:
        hf_cfg["text_config"]["vocab_size"] += 1
    if "architectures" not in hf_cfg:  # (an LVLM config writes its own)
        hf_cfg["architectures"] = [_ARCHITECTURES[hf_cfg["model_type"]]]
    hf_cfg["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        str(entries[0][1]), "float32")
    tmp = None
    if writer:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-",
                                    dir=None if remote else out_dir.parent))
    show = progress if progress is not None else len(entries) >= PROGRESS_MIN_TENSORS
    failure = None  # a write error: the writer keeps taking part in the gathers, then raises
    try:
        it = iter(tensors)
        with progress_bar(total=len(entries), desc=f"saving {out_dir.name}", unit="tensor",
                  disable=not show or not writer) as bar:
            for name, group in zip(names, files):
                def arrays(n=len(group)):
                    for _ in range(n):
                        key, parts = next(it)
                        a = [_hf_layout(p, _gather(x, layer).astype(dtype or x.dtype, copy=False))
                             for x, layer, p in parts]
                        if key in grow:  # the <image> row: the mean of the vocabulary's rows
                            a.append(a[0].mean(0, keepdims=True, dtype=np.float32).astype(a[0].dtype))
                        bar.update(1)
                        yield a[0] if len(a) == 1 else np.concatenate(a)
                stream = arrays()
                if writer and failure is None:
                    try:
                        write_stream(tmp / name, [e[:3] for e in group], stream, {"format": "pt"})
                    except OSError as e:
                        failure = e
                for _ in stream:  # the rest of the gathers (all of them on other processes)
                    pass
        if collective:
            parallel.sync("save_pretrained gathered")
        if failure is not None:
            raise failure
        if writer:
            if len(files) > 1:
                index = {"metadata": {"total_size": sum(e[3] for e in entries)},
                         "weight_map": {e[0]: n for n, g in zip(names, files) for e in g}}
                (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
            if image_processor is not None:  # a reload preprocesses as this model did
                (tmp / processor.FILE).write_text(json.dumps(image_processor, indent=2, sort_keys=True) + "\n")
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
