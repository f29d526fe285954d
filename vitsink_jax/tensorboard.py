"""TensorBoard scalars written directly, in TensorBoard's event-file format, so train.py needs
neither TensorFlow nor tensorboardX (whose writer imports torch: ~2 s of every start where torch
is installed).

An event file is a sequence of TFRecords (length, its masked CRC-32C, the bytes, their masked
CRC-32C), each one serialized ``tensorboard.Event`` protobuf: first one naming the file version,
then one per scalar (wall time, step, a ``Summary`` holding one ``simple_value`` under its tag).
The few protobuf fields are encoded by hand.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import numpy as np

from . import paths


def _crc32c_table() -> list:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecords."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """``data`` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64: negative steps as two's complement
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _message(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings, nested messages)."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int = 0, file_version: str = "", scalar: tuple = ()) -> bytes:
    """A serialized ``Event``: wall_time (1, double), step (2, int64), file_version (3) or a
    summary (5) of one value: tag (1) and simple_value (2, float), from ``scalar`` = (tag, value)."""
    out = struct.pack("<Bd", 1 << 3 | 1, wall_time)
    if step:
        out += _varint(2 << 3) + _varint(step)
    if file_version:
        out += _message(3, file_version.encode())
    if scalar:
        tag, value = scalar
        with np.errstate(over="ignore"):  # beyond float32: +-inf, as TensorBoard would show it
            as_float = np.float32(value).astype("<f4").tobytes()
        value_msg = _message(1, tag.encode()) + bytes([2 << 3 | 5]) + as_float
        out += _message(5, _message(1, value_msg))
    return out


class ScalarWriter:
    """``add_scalar(tag, value, step)`` into a new event file in ``folder`` (created), named as
    TensorBoard's writers name theirs (on an object store: uploaded every few seconds and at
    close, :func:`vitsink_jax.paths.append`)."""

    def __init__(self, folder):
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
        self.path = paths.path(folder) / name
        self._file = paths.append(self.path, "ab")
        self._file.write(tfrecord(event(time.time(), file_version="brain.Event:2")))
        self._file.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._file.write(tfrecord(event(time.time(), int(step), scalar=(tag, float(value)))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
