"""Padding token rows into batches: length buckets (bound the number of compiled shapes) and
left / right padding with the matching attention mask."""

from __future__ import annotations

import numpy as np


def bucket(n: int, size: int) -> int:
    """n rounded up to a multiple of ``size`` (length buckets bound the number of compiles)."""
    return -(-n // size) * size


def _pad(rows: list, length: int, fill, left: bool) -> tuple[np.ndarray, np.ndarray]:
    first = np.asarray(rows[0])
    out = np.full((len(rows), length), fill, first.dtype if first.dtype == bool else np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"row {i} has {len(r)} tokens, more than the padded length {length}")
        span = slice(length - len(r), length) if left else slice(0, len(r))
        out[i, span], mask[i, span] = r, 1
    return out, mask


def left_pad(rows: list, length: int, pad_id=0) -> tuple[np.ndarray, np.ndarray]:
    """Rows (1-D int or bool arrays) -> (rows [B, length] left-padded with ``pad_id``, mask
    [B, length] int32, 1 on the tokens): prompts for generation."""
    return _pad(rows, length, pad_id, left=True)


def right_pad(rows: list, length: int, pad_id=0) -> tuple[np.ndarray, np.ndarray]:
    """Rows (1-D int or bool arrays) -> (rows [B, length] right-padded with ``pad_id``, mask
    [B, length] int32): sequences for a forward (scoring, training)."""
    return _pad(rows, length, pad_id, left=False)
