"""Records (lists of flat dicts) <-> tensorflow-datasets builders in ``array_record`` format,
written and read without TensorFlow: each host reading its own ``tfds.even_splits`` share
(:func:`read_builder`), or any record by its writing index (:class:`Records`, for builders
written with ``ordered=True``).

A schema maps each field to "text", "bytes" (e.g. an encoded image), "text_list" or "int".
Builders live in ``data_dir/local_records/<name>/1.0.0``; writing the same name again replaces
the old builder. Records come back in the order they were written.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np

KINDS = ("text", "bytes", "text_list", "int")


def write_builder(records: list, name: str, data_dir, schema: dict, ordered: bool = False) -> Path:
    """Writes ``records`` (split "test") and returns the builder's folder; ``ordered`` stores
    them in writing order (tfds' ``disable_shuffling``), so :class:`Records` reads record i
    at index i."""
    root = Path(data_dir) / "local_records" / name
    if root.exists():
        shutil.rmtree(root)
    with contextlib.redirect_stdout(io.StringIO()):  # tfds' "Downloading and preparing" banner
        _builder(name, data_dir, schema, records, ordered).download_and_prepare()
    return root


class Records:
    """A builder written with ``ordered=True`` as a read-only sequence: ``records[i]`` is the
    i-th record written (text decoded to str), read from the array_record files on access
    (nothing is held in memory)."""

    def __init__(self, name: str, data_dir, schema: dict):
        root = Path(data_dir) / "local_records" / name
        if not root.is_dir():
            raise FileNotFoundError(f"no tfds builder {name!r} under {data_dir} (looked in {root})")
        self.name, self.schema = name, schema
        self.source = _builder(name, data_dir, schema).as_data_source(split="test")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        ex = self.source[int(i)]
        if int(ex["order"]) != i:
            raise ValueError(f"tfds builder {self.name!r} holds record {int(ex['order'])} at index "
                             f"{i}: it was not written with ordered=True")
        return _decode(ex, self.schema)


def read_builder(name: str, data_dir, schema: dict, process_index: int = 0,
                 process_count: int = 1) -> list:
    """This host's share of a builder, as records in writing order (text decoded to str)."""
    import tensorflow_datasets as tfds

    root = Path(data_dir) / "local_records" / name
    if not root.is_dir():
        raise FileNotFoundError(f"no tfds builder {name!r} under {data_dir} (looked in {root})")
    split = tfds.even_splits("test", n=process_count)[process_index]
    out = [(int(ex["order"]), _decode(ex, schema))
           for ex in _builder(name, data_dir, schema).as_data_source(split=split)]
    return [rec for _, rec in sorted(out, key=lambda x: x[0])]


def _decode(ex: dict, schema: dict) -> dict:
    rec = {}
    for key, kind in schema.items():
        v = ex[key]
        if kind == "text":
            v = v.decode() if isinstance(v, bytes) else str(v)
        elif kind == "text_list":
            v = [x.decode() if isinstance(x, bytes) else str(x) for x in v]
        elif kind == "int":
            v = int(v)
        rec[key] = v
    return rec


def _features(schema: dict):
    import tensorflow_datasets as tfds

    bad = {k: v for k, v in schema.items() if v not in KINDS}
    if bad:
        raise ValueError(f"unknown field kinds {bad}; use {KINDS}")
    make = {"text": tfds.features.Text, "int": lambda: tfds.features.Scalar(np.int64),
            "bytes": lambda: tfds.features.Tensor(shape=(), dtype=np.object_),
            "text_list": lambda: tfds.features.Sequence(tfds.features.Text())}
    feats = {k: make[v]() for k, v in schema.items()}
    feats["order"] = tfds.features.Scalar(np.int64)
    return tfds.features.FeaturesDict(feats)


_CLASS = None  # the builder class, defined on first use (tfds is imported lazily)


def _builder(name: str, data_dir, schema: dict, records=None, ordered: bool = False):
    import tensorflow_datasets as tfds

    global _CLASS
    if _CLASS is None:
        class LocalRecords(tfds.core.GeneratorBasedBuilder):
            """Local records in a given schema (one builder config per dataset name)."""

            VERSION = tfds.core.Version("1.0.0")
            code_path = None  # not a packaged tfds dataset: no checksums file to look for

            def __init__(self, schema, records=None, ordered=False, **kw):
                self._schema, self._records, self._ordered = schema, records, ordered
                super().__init__(**kw)

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=_features(self._schema),
                                             disable_shuffling=self._ordered)

            def _split_generators(self, dl_manager):
                del dl_manager
                return {"test": self._generate_examples()}

            def _generate_examples(self):
                for i, rec in enumerate(self._records):
                    yield i, {**{k: rec[k] for k in self._schema}, "order": i}

        _CLASS = LocalRecords
    return _CLASS(schema, records=records, ordered=ordered, data_dir=str(data_dir),
                  file_format="array_record",
                  config=tfds.core.BuilderConfig(name=name))
