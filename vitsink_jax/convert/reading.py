"""Loading a Hugging Face model folder, from one device up to a pod slice.

:func:`load_pretrained` resolves the folder, builds the config and the model, and
:func:`load_params` places the plan (:func:`~vitsink_jax.convert.load_plan.load_plan`) on the
devices: every param is created as a global ``jax.Array`` with its sharding, each process
reading only the row range of each tensor that its own devices hold (plain positioned reads, no
memory map), cast per device slice and handed to ``jax.make_array_from_callback``. Without a
mesh the sharding is the default device, which is the single-device load.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .. import resolved
from ..config import ModelConfig, config_from_hf
from ..progress import progress as progress_bar
from . import processor
from .folders import PROGRESS_MIN_TENSORS, open_weights, read_config, resolve_model_path
from .hf import build_model
from .load_plan import Planned, first_few, load_plan, untie_differing_head
from .safetensors_io import HOST_ALIGN, CheckpointError, SafetensorsFile, aligned_empty


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
            raise CheckpointError(f"shardings has no entry for {first_few(['/'.join(p) for p in missing])}")
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
                          f"divides by {mesh.shape['fsdp']}): {first_few(whole, 5)}", stacklevel=4)
    return out



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

