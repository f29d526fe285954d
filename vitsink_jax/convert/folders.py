"""A Hugging Face model folder on disk: where it lives (a folder, or a hub repo id in the
huggingface_hub cache), its ``config.json`` and its weight files, opened as readers whose
headers alone are parsed (:class:`~vitsink_jax.convert.safetensors_io.SafetensorsFile`) or,
for PyTorch ``.bin`` files, read whole (:class:`BinFile`).

The load plan (:mod:`~vitsink_jax.convert.load_plan`), the sharded reads
(:mod:`~vitsink_jax.convert.reading`) and the streamed writer
(:mod:`~vitsink_jax.convert.writing`) all start from here.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from .. import paths
from .safetensors_io import CheckpointError, SafetensorsFile, TensorInfo

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
PROGRESS_MIN_TENSORS = 200  # auto progress bar above this many tensors
HUB_FILES = ["config.json", "*.safetensors", "*.json", "*.model", "*.txt", "*.bin"]


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
