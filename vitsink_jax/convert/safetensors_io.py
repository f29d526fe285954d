"""The safetensors file format read in byte ranges and written as a stream.

safetensors' own ``safe_open`` memory-maps a file: every page a load touches stays in the
process's resident set until the handle closes, so reading a 5 GB shard through it shows 5 GB of
RSS even when the process keeps a tenth of it. Here a file's header is parsed once and a tensor
(or a range of its rows) is read with a plain positioned read into a fresh numpy buffer: a
process holds exactly what it asked for. The writer streams tensors one at a time behind a header
computed from their shapes, so a writer never holds more than the tensor it is writing.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N
bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
(offsets relative to the end of the header), then the tensors' bytes, C order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # safetensors refuses headers above 100 MB too


HOST_ALIGN = 64  # bytes: a host buffer this aligned is aliased by jax.device_put on a CPU, not copied


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a :data:`HOST_ALIGN` boundary
    (numpy's own allocations are 16-byte aligned), so that placing it on a CPU device copies
    nothing."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGN, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted faithfully (missing/corrupt file, bad keys/shapes);
    the message names the file, key or shape."""


def _corrupt(path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or truncated safetensors file ({detail})")


class TensorInfo:
    """One tensor of a file: dtype, shape, absolute byte offset and size."""

    __slots__ = ("dtype", "shape", "start", "nbytes")

    def __init__(self, dtype, shape, start, nbytes):
        self.dtype, self.shape, self.start, self.nbytes = dtype, shape, start, nbytes


class SafetensorsFile:
    """The header of one safetensors file; :meth:`read` fetches a tensor or a row range of it.

    Raises :class:`CheckpointError` naming the file for a bad header, an unknown dtype, offsets that
    do not tile the data, or a file shorter than its header says (truncated).
    """

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > min(MAX_HEADER, size - 8):
                    raise _corrupt(self.path, f"header length {n} in a file of {size} bytes")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _corrupt(self.path, f"unreadable header: {e}") from e
        if not isinstance(header, dict):
            raise _corrupt(self.path, "the header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        entries = []
        for key, h in header.items():
            try:
                dtype, shape, (b, e) = np.dtype(DTYPES[h["dtype"]]), tuple(h["shape"]), h["data_offsets"]
                if not all(isinstance(v, int) and v >= 0 for v in (*shape, b, e)):
                    raise ValueError("shape and offsets must be non-negative integers")
            except (KeyError, TypeError, ValueError) as err:
                raise _corrupt(self.path, f"tensor {key!r} has a bad header entry {h!r}: {err!r}") from err
            entries.append((b, e, key, dtype, shape, h))
        self.tensors, end = {}, 0
        for b, e, key, dtype, shape, h in sorted(entries, key=lambda t: t[0]):
            if b != end or e - b != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise _corrupt(self.path, f"tensor {key!r} offsets {[b, e]} do not fit its shape "
                                          f"{shape} / dtype {h['dtype']} after byte {end}")
            self.tensors[key], end = TensorInfo(dtype, shape, 8 + n + b, e - b), e
        if size < 8 + n + end:
            raise _corrupt(self.path, f"{size} bytes, the header describes {8 + n + end}")

    def keys(self) -> list:
        return list(self.tensors)

    def read(self, key: str, rows: Optional[slice] = None) -> np.ndarray:
        """Tensor ``key`` (rows ``rows.start:rows.stop`` of its first axis when given, step 1) as
        a fresh numpy array (:func:`aligned_empty`: the file's bytes are read straight into the
        buffer a CPU device then uses); only those bytes are read."""
        t = self.tensors[key]
        shape, start, nbytes = t.shape, t.start, t.nbytes
        if rows is not None and shape:
            lo, hi, _ = rows.indices(shape[0])
            row = nbytes // shape[0] if shape[0] else 0
            shape, start, nbytes = (max(hi - lo, 0),) + shape[1:], start + lo * row, max(hi - lo, 0) * row
        out = aligned_empty(shape, t.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8)) if nbytes else memoryview(b"")
        with open(self.path, "rb") as f:
            f.seek(start)
            got = f.readinto(buf) if nbytes else 0
        if got != nbytes:
            raise _corrupt(self.path, f"tensor {key!r}: read {got} of {nbytes} bytes at offset {start}")
        return out


def header_bytes(entries: Iterable[tuple], metadata: Optional[dict] = None) -> tuple[bytes, int]:
    """(the 8-byte length + JSON header for ``entries`` = (name, numpy dtype, shape) in file
    order, the data size in bytes)."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, dtype, shape in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw, offset


def write_stream(path, entries: list, arrays: Iterable, metadata: Optional[dict] = None) -> int:
    """Writes ``path`` from ``entries`` (name, dtype, shape) and the matching numpy arrays, which
    may be a generator producing them one at a time; returns the bytes written. Every array must
    have its entry's dtype and shape (checked, naming the tensor)."""
    head, size = header_bytes(entries, metadata)
    written = 0
    with open(path, "wb") as f:
        f.write(head)
        it = iter(arrays)
        for name, dtype, shape in entries:
            a = next(it)
            if a.dtype != np.dtype(dtype) or tuple(a.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} is {a.dtype}{list(a.shape)}, the header "
                                 f"says {np.dtype(dtype)}{list(shape)}")
            f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
            written += a.nbytes
        f.flush()
        os.fsync(f.fileno())
    assert written == size
    return len(head) + size
