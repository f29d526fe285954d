"""Shared-prefix scoring plans: benchmark items that show the same image share the start of
their prompt (the template's opening, the image's tokens), so that prefix goes through the ViT,
the projector and the LLM once per image and only each item's own tokens (question, options,
candidates) run per item, against the prefix's KV cache. The scores are those of a full forward
per row (causal attention: a token's output depends on the tokens before it only).

This module plans it on the host: which rows share a prefix (:func:`prefix_groups`), which groups
go through the device together (:func:`pack_units`) and their padded shapes (:class:`Unit`,
:func:`batch_shapes`); :func:`vitsink_jax.eval_lib.make_shared_scorer` runs a batch of units.

A unit is self-contained (its groups and the rows reading them), so units split over devices as
rows do: a batch holds one unit per local device.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple, Optional

import numpy as np

from .data.padding import bucket


class Group(NamedTuple):
    """Rows (positions in the row list) whose first ``prefix`` tokens are the same and hold
    their image's every token."""
    prefix: int
    rows: tuple


class Unit(NamedTuple):
    """Groups scored together: ``groups`` in order; row j of the unit reads group ``of_row[j]``."""
    groups: tuple
    of_row: tuple

    @property
    def rows(self) -> list:
        return [n for g in self.groups for n in g.rows]


def shares_prefixes(model) -> bool:
    """Whether the model's visual tokens and LLM states over a prompt prefix do not depend on
    what follows: not with token pruning (FastV reads the last token's attention), VAR, a DIYSink
    ReW model (its weights read the question) or the scanned layout (no KV cache there)."""
    iv, diysink = model.interventions, model.config.diysink
    return (not model.scan_layers and iv.prune is None and iv.var is None
            and not (diysink is not None and diysink.reweight))


def first_scored(ids: np.ndarray, targets: np.ndarray) -> int:
    """The first position whose logits a scoring row reads: its first target's, or its last
    token's (the next-token candidates)."""
    scored = np.flatnonzero(targets >= 0)
    return int(scored[0]) if len(scored) else len(ids) - 1


def prefix_groups(rows: list, image_keys: list, image_token: int, capacity: int) -> Optional[list]:
    """The rows that show the same image, in groups of at most ``capacity`` rows, each with the
    number of leading tokens its rows share and no row reads logits of (:func:`first_scored`).

    rows: (record index, (ids [L], targets [L], ...)) as ``loglik_scores`` lists them;
    image_keys: per record its image (equal keys: the same image). Returns [:class:`Group`], or
    None when some group's shared prefix does not reach past its last image token by a text
    token (its image would not be computed once, or, with tokens moved or dropped, the cache's
    next position could differ from the full row's)."""
    by_image = defaultdict(list)
    for n, (i, _) in enumerate(rows):
        by_image[image_keys[i]].append(n)
    groups = []
    for members in by_image.values():
        for start in range(0, len(members), capacity):
            part = members[start:start + capacity]
            ids = [rows[n][1][0] for n in part]
            prefix = min(first_scored(rows[n][1][0], rows[n][1][1]) for n in part)
            for other in ids[1:]:
                same = other[:prefix] == ids[0][:prefix]
                prefix = min(prefix, int(np.argmin(np.append(same, False))))
            images = [np.flatnonzero(x == image_token) for x in ids]
            # a text token after the last image token, inside the prefix: the cache's next
            # position is then the full row's, whatever the image's tokens were moved or dropped
            if prefix < 1 or any(len(at) and at[-1] >= prefix - 1 for at in images):
                return None
            groups.append(Group(prefix, tuple(part)))
    return groups


def pack_units(groups: list, rows: list, capacity: int) -> list:
    """Groups packed in order of (prefix, longest suffix) into units of at most ``capacity``
    rows (a group is never split: padding a unit's rows is cheaper than computing a prefix
    twice). Returns [:class:`Unit`]."""
    def suffix(g):
        return max(len(rows[n][1][0]) - g.prefix for n in g.rows)

    units, current = [], []
    for g in sorted(groups, key=lambda g: (g.prefix, suffix(g))):
        if current and sum(len(c.rows) for c in current) + len(g.rows) > capacity:
            units.append(current)
            current = []
        current.append(g)
    units.append(current)
    return [Unit(tuple(u), tuple(k for k, g in enumerate(u) for _ in g.rows)) for u in units if u]


def batch_shapes(units: list, rows: list, length_bucket: int, capacity: int) -> dict:
    """Padded shapes of a batch of units: groups per unit U (a power of two, at most
    ``capacity``), prefix length P and suffix length S (multiples of ``length_bucket``)."""
    groups = max(len(u.groups) for u in units)
    prefix = max(g.prefix for u in units for g in u.groups)
    suffix = max(len(rows[n][1][0]) - g.prefix for u in units for g in u.groups for n in g.rows)
    return {"groups": min(1 << (groups - 1).bit_length(), capacity),
            "prefix": bucket(prefix, length_bucket), "suffix": bucket(suffix, length_bucket)}
