"""``--config.help``: every key of a run's config with its default and what it means, the
meaning read from the comments of the config file itself (the one source of both).

A key's note is the comment on its assignment line (``c.eval.batch_size = 8  # rows per
forward``) with the comment-only lines that continue it (indented past the assignment), or else
the block comment just above the assignment that created it or its parent (``# sink rule: ...``
above ``c.sink = ml_collections.ConfigDict(...)`` describes ``sink.rule``, ``sink.tau``, ...).
"""

from __future__ import annotations

import re

from .options import flatten

_ASSIGN = re.compile(r"^(\s*)c\.([\w.]+)\s*=")


def _comment(line: str) -> str:
    """The ``# ...`` part of a source line (outside quotes), stripped; "" when none."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[i + 1:].strip()
    return ""


def key_notes(source: str) -> dict:
    """{dotted key as assigned in ``source`` (``eval.batch_size``, ``sink``): its note}."""
    notes, block, last = {}, [], None
    for line in source.splitlines():
        stripped = line.strip()
        m = _ASSIGN.match(line)
        if m:
            indent, key = len(m.group(1)), m.group(2)
            own = _comment(line)
            notes[key] = own or " ".join(block)
            block, last = [], (key, indent, bool(own))
        elif stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            key, indent, own = last or (None, 0, False)
            if own and len(line) - len(line.lstrip()) > indent + 4:  # continues the line above
                notes[key] += " " + text
            else:
                block, last = block + [text], None
        elif stripped:
            block, last = [], None if not stripped.endswith((",", "(", ")")) else last
    return notes


def _source_order(keys, source: str) -> list:
    """``keys`` in the order the file first assigns them or their nearest assigned parent."""
    first = {}
    for i, line in enumerate(source.splitlines()):
        m = _ASSIGN.match(line)
        if m:
            first.setdefault(m.group(2), i)

    def position(key):
        parts = key.split(".")
        return next((first[".".join(parts[:n])] for n in range(len(parts), 0, -1)
                     if ".".join(parts[:n]) in first), len(first))
    return sorted(keys, key=position)


def config_help(cfg, source: str, path: str, width: int = 100) -> str:
    """The text ``--config.help`` prints for ``cfg`` (a ConfigDict made by the config file at
    ``path`` whose text is ``source``): every key as ``--config.KEY=DEFAULT`` in the file's
    order with its note; a group's block comment once, above its first key."""
    import textwrap

    notes, shown = key_notes(source), set()
    lines = [f"config keys of {path}: default and meaning; set any with --config.KEY=VALUE", ""]
    values = flatten(cfg)
    for key in _source_order(values, source):
        parts = key.split(".")
        parents = [".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)]
        group = next((g for g in parents if notes.get(g)), None)
        if not notes.get(key) and group and group not in shown:
            shown.add(group)
            lines += textwrap.wrap(f"{group}: {notes[group]}", width, initial_indent="  ",
                                   subsequent_indent="    ")
        lines.append(f"  --config.{key}={values[key]!r}")
        if notes.get(key):
            lines += textwrap.wrap(notes[key], width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
