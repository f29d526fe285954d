"""The streamed build of a LLaVA-format instruction file into an array_record dataset.

LLaVA-665K is ~665,000 conversations over ~100 GB of images: no host holds that, so nothing
here holds more than a shard's worth of rows' text, and no image longer than it takes to check
and write it.

* The JSON list is read item by item (:func:`iter_json_list`), never parsed whole.
* Items are cut into shards of ``shard_rows`` consecutive source items. A pool of worker
  processes takes a shard each: it checks every row (:func:`parse_item`), decodes its image in
  full once (a bad file is skipped here, not found at its training step), tokenizes the
  conversation as training will (:func:`~vitsink_jax.data.instruct.tokenize_conversation`) to
  learn its length, and streams the rows into the shard's array_record file, written aside
  and renamed into place.
* A finished shard leaves a small JSON result (rows kept, their lengths, the skipped rows with
  their reasons) in ``progress/``: a killed build continues from its last finished shard.
* At the end the tfds metadata (``dataset_info.json``, ``features.json``) and the manifest
  (``manifest.json``: rows, each row's token length, skipped rows named ``file:item N (id I):
  reason``) are written; the manifest goes last and marks the build complete.

The built folder is read with ``tfds.builder_from_directory(...).as_data_source()``
(:class:`InstructData`): record i is the i-th kept row in source order. Each row's token length
comes from the manifest, so no training step tokenizes another host's rows to learn a length.
The build depends on the tokenizer and prompt format (lengths, and rows too long for the model
are skipped or truncated), so its folder name carries a key of both (:func:`build_key`).

Conversations without an image (LLaVA-665K's ~40,000 ShareGPT text turns) are kept: their
``image`` field is empty and LLaVA-1.5 trains on them with no image tokens
(:func:`vitsink_jax.data.instruct.tokenize_conversation`).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

from .preprocess import check_image
from .tfds_io import _decode, _features
from .tokenizer import IMAGE_PLACEHOLDER

SCHEMA = {"id": "text", "image": "bytes", "roles": "text_list", "texts": "text_list"}
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
DATASET = "instruct"
TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}"
TOO_LONG = ("skip", "truncate")


class InstructError(ValueError):
    """An instruction file that cannot be used (the message names the file)."""


# ------------------------------------------------------------------------------ reading ---

MAX_ITEM_CHARS = 64 << 20  # an item that does not parse within this much text is refused


def iter_json_list(path, chunk_bytes: int = 1 << 20, opened=None,
                   max_item: int = MAX_ITEM_CHARS) -> Iterator[tuple[int, object]]:
    """(n, item) for the items of the JSON list in ``path``, n counting from 1, parsed one at a
    time from a buffer of about ``chunk_bytes`` (plus the item being read): the file is never
    held whole. ``opened``: the file already open in binary mode. Raises
    :class:`InstructError` naming the file (and the item) when it is not a JSON list, or when an
    item does not parse within ``max_item`` characters (a syntax error inside an item is thus
    found without reading the rest of the file)."""
    decoder, text, pos, n, eof = json.JSONDecoder(), "", 0, 0, False
    reader = codecs.getincrementaldecoder("utf-8-sig")()

    with (opened or open(path, "rb")) as f:
        def more() -> bool:
            nonlocal text, pos, eof
            if eof:
                return False
            raw = f.read(chunk_bytes)
            eof = not raw
            text = text[pos:] + reader.decode(raw, final=eof)
            pos = 0
            return True

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(text) and text[pos].isspace():
                    pos += 1
                if pos < len(text) or not more():
                    return text[pos] if pos < len(text) else ""

        try:
            if skip_space() != "[":
                raise InstructError(f"{path}: expected a JSON list of conversations")
            pos += 1
            if skip_space() == "]":
                return
            while True:
                while True:
                    try:
                        item, end = decoder.raw_decode(text, pos)
                        if end < len(text) or eof:
                            break
                    except json.JSONDecodeError:
                        if eof or len(text) - pos > max_item:
                            raise
                    more()
                n += 1
                yield n, item
                pos = end
                sep = skip_space()
                if sep == "]":
                    return
                if sep != ",":
                    found = f"found {sep!r}" if sep else "the file ends"
                    raise InstructError(f"{path}: not valid JSON after item {n} (expected ',' or "
                                        f"']', {found})")
                pos += 1
                skip_space()
        except json.JSONDecodeError as e:
            raise InstructError(f"{path}: not valid JSON in item {n + 1} ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise InstructError(f"{path}: not UTF-8 ({e})") from None


def conversation_turns(turns) -> tuple[list, list]:
    """(roles, texts) of a JSON conversation's turns; ValueError when it has none or an unknown
    role. A first turn from "gpt" is dropped, as LLaVA's ``preprocess_v1`` and TinyLLaVA drop
    it (a conversation starts at its first human turn)."""
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise ValueError("no 'conversations' list of turns")
    roles = [ROLES.get(t.get("from", "")) for t in turns]
    if None in roles:
        raise ValueError(f"unknown role in {[t.get('from') for t in turns]}")
    if roles[0] == "gpt":
        turns, roles = turns[1:], roles[1:]
        if not turns:
            raise ValueError("only one turn, from 'gpt'")
    return roles, [str(t.get("value", "")) for t in turns]


def parse_item(item, folder: Path) -> tuple[dict, Optional[Path]]:
    """(record fields id / roles / texts (:func:`conversation_turns`), the image's path or None
    for a text-only conversation) of one JSON item; raises ValueError with the reason when the
    item cannot be used: not a dict, no turns, an unknown role, not exactly one ``<image>`` with
    an image (or any without one), a missing image file."""
    if not isinstance(item, dict):
        raise ValueError(f"not a JSON object but {type(item).__name__}")
    roles, texts = conversation_turns(item.get("conversations"))
    placeholders = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    image = item.get("image")
    if image and placeholders != 1:
        raise ValueError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders in the conversation; "
                         "its one image needs exactly one")
    if not image and placeholders:
        raise ValueError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders but no 'image'")
    path = None
    if image:
        path = folder / str(image)
        if not path.is_file():
            raise ValueError(f"image {path} not found")
    return {"id": str(item.get("id", "")), "roles": roles, "texts": texts}, path


def read_image(path: Path) -> bytes:
    """The file's bytes, decoded in full once (ValueError naming the file when they do not
    decode as an image)."""
    raw = path.read_bytes()
    try:
        check_image(raw)
    except ValueError as e:
        raise ValueError(f"image {path} does not decode as an image ({e})") from None
    return raw


# ----------------------------------------------------------------------------- the build ---

@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """How rows are tokenized: the tokenizer, the model's prompt format
    (:func:`~vitsink_jax.data.prompts.prompt_format`), the system prompt, the training
    template ("chat" or LLaVA's "plain" pre-training format) and whether each turn's image goes
    first (:func:`~vitsink_jax.data.instruct.tokenize_conversation`), the longest row allowed
    (tokens, image expanded) and what happens to a longer one (:data:`TOO_LONG`)."""

    tokenizer: object
    fmt: object
    system: str = ""
    max_length: int = 0
    too_long: str = "skip"
    template: str = "chat"
    image_first: bool = False

    def tokenize(self, roles: list, texts: list) -> tuple:
        """(ids [T], loss_mask [T], question_mask [T]) of a conversation, not cut to the limit."""
        from .instruct import tokenize_conversation

        return tokenize_conversation(self.tokenizer, roles, texts, self.fmt, self.system,
                                     self.template, self.image_first)

    def length(self, roles: list, texts: list) -> int:
        """Tokens of the conversation (at most ``max_length``); ValueError when it is longer
        than ``max_length`` and ``too_long`` is "skip"."""
        n = len(self.tokenize(roles, texts)[0])
        if self.max_length and n > self.max_length:
            if self.too_long == "skip":
                raise ValueError(f"{n} tokens, longer than the limit of {self.max_length} "
                                 "(--config.data.max_length; --config.data.too_long=truncate keeps "
                                 "its start)")
            return self.max_length
        return n


def build_key(source: dict, spec: Optional[TokenSpec]) -> str:
    """A 16-hex key of what the built rows depend on: the source (the JSON file's sha256 and
    image folder, or the embedded set's settings) and how they are tokenized (the tokenizer's
    full serialization, the prompt format, system prompt and length limit)."""
    h = hashlib.sha256(json.dumps(source, sort_keys=True).encode())
    if spec is not None:
        tok = spec.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        h.update((backend.to_str() if backend is not None
                  else json.dumps(sorted(tok.get_vocab().items()))).encode())
        h.update(repr((type(tok).__name__, tok.bos_token_id, tok.eos_token_id, tok.eos_token,
                       dataclasses.replace(spec, tokenizer=None))).encode())
    return h.hexdigest()[:16]


_SPEC: Optional[TokenSpec] = None  # a build worker's tokenization (set by _init_worker)


class Record(dict):
    """A record made in memory (fields of :data:`SCHEMA`), built as it is; a JSON item is a
    plain dict and is checked (:func:`parse_item`)."""


def _init_worker(spec) -> None:
    global _SPEC
    _SPEC = spec


def _shard_file(folder, shard: int) -> Path:
    return Path(folder) / TEMPLATE.format(DATASET=DATASET, SPLIT="train", FILEFORMAT="array_record",
                                          SHARD_INDEX=f"{shard:05d}")


def write_shard(task: tuple) -> dict:
    """Builds one shard: ``task`` = (shard index, [(n, item or record)], image folder, source
    name, output folder). An item is a JSON item (checked and its image read here); a
    :class:`Record` is written as it is (the embedded set). Returns the shard's result:
    ``rows`` kept, their source ``items`` and token ``lengths``, and ``skipped`` lines."""
    from array_record.python.array_record_module import ArrayRecordWriter

    shard, items, folder, source, out = task
    features = _features(SCHEMA)
    result = {"shard": shard, "rows": 0, "items": [], "lengths": [], "skipped": []}
    target = _shard_file(out, shard)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out)
    os.close(fd)
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
        for n, item in items:
            try:
                if isinstance(item, Record):
                    rec = item
                else:
                    rec, image = parse_item(item, Path(folder))
                    rec["id"] = rec["id"] or str(n)
                    rec["image"] = read_image(image) if image else b""
                length = _SPEC.length(rec["roles"], rec["texts"]) if _SPEC is not None else -1
                example = features.serialize_example({**{k: rec[k] for k in SCHEMA}, "order": n})
            except Exception as e:  # noqa: BLE001  (one bad row never stops the build)
                ident = item.get("id", "?") if isinstance(item, dict) else "?"
                reason = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
                result["skipped"].append(f"{source}:item {n} (id {ident}): {reason}")
                continue
            writer.write(example)
            result["rows"] += 1
            result["items"].append(n)
            result["lengths"].append(length)
    finally:
        writer.close()
    os.replace(tmp, target)
    return result


def build(items: Iterator, folder: Path, source: dict, source_name: str, image_folder,
          spec: Optional[TokenSpec], workers: int = 0, shard_rows: int = 1000,
          total_bytes: Optional[int] = None, verbose: bool = True) -> dict:
    """Writes the rows of ``items`` ((n, JSON item) pairs, or (n, :class:`Record`) for records
    made in memory) into ``folder`` as described in the module docstring and returns the
    manifest. ``workers`` processes build the shards (0: in this process); a build of the same
    ``source`` and ``shard_rows`` killed earlier in ``folder`` continues from its finished
    shards. ``total_bytes``: the size of the source, for the progress line."""
    from ..progress import progress
    from ..provenance import write_json

    folder = Path(folder)
    plan = {"source": source, "shard_rows": shard_rows}
    done_dir = folder / "progress"
    if (folder / "build.json").is_file() and json.loads((folder / "build.json").read_text()) == plan:
        finished = {int(p.stem): json.loads(p.read_text()) for p in done_dir.glob("*.json")}
        finished = {s: r for s, r in finished.items() if _shard_file(folder, s).is_file()}
        if finished and verbose:
            print(f"{folder}: continuing the build after {len(finished)} finished shard(s)")
    else:
        if folder.exists():
            shutil.rmtree(folder)
        finished = {}
        write_json(folder / "build.json", plan)
    done_dir.mkdir(parents=True, exist_ok=True)
    results = dict(finished)
    bar = progress(total=total_bytes, desc=f"build {folder.name}", unit="B", disable=not verbose)

    def finish(result: dict, end: int) -> None:
        write_json(done_dir / f"{result['shard']:05d}.json", result)
        results[result["shard"]] = result
        bar.update(end - bar.n if total_bytes else result["rows"])

    def shards():
        shard, chunk = 0, []
        for n, item in items:
            chunk.append((n, item))
            if len(chunk) == shard_rows:
                yield shard, chunk, getattr(items, "position", 0)
                shard, chunk = shard + 1, []
        if chunk:
            yield shard, chunk, getattr(items, "position", 0)

    tasks = ((s, chunk, end) for s, chunk, end in shards() if s not in finished)
    if workers <= 0:
        _init_worker(spec)
        try:
            for s, chunk, end in tasks:
                finish(write_shard((s, chunk, str(image_folder), source_name, str(folder))), end)
        finally:
            _init_worker(None)
    else:
        ctx = multiprocessing.get_context("spawn")  # JAX's threads make fork unsafe
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(spec,)) as pool:
            pending = []
            for s, chunk, end in tasks:
                pending.append((pool.submit(write_shard, (s, chunk, str(image_folder), source_name,
                                                          str(folder))), end))
                while len(pending) >= 2 * workers:  # a bounded queue: items stay on disk
                    future, at = pending.pop(0)
                    finish(future.result(), at)
            for future, at in pending:
                finish(future.result(), at)
    bar.close()
    return _finish(folder, source, [results[s] for s in sorted(results)], verbose)


def _finish(folder: Path, source: dict, results: list, verbose: bool) -> dict:
    import tensorflow_datasets as tfds

    from ..provenance import write_json

    shard_lengths = [r["rows"] for r in results]
    if results and [r["shard"] for r in results] != list(range(len(results))):
        raise RuntimeError(f"{folder}: shards {[r['shard'] for r in results]} are not contiguous")
    skipped = [line for r in results for line in r["skipped"]]
    if not sum(shard_lengths):
        raise InstructError(f"{source.get('json', 'the instruction data')}: all "
                            f"{len(skipped)} items were skipped" + (f" (first: {skipped[0]})" if skipped else ""))
    template = tfds.core.ShardedFileTemplate(data_dir=folder, template=TEMPLATE, dataset_name=DATASET,
                                             split="train", filetype_suffix="array_record")
    split = tfds.core.SplitInfo(name="train", shard_lengths=shard_lengths, num_bytes=0,
                                filename_template=template)
    tfds.folder_dataset.write_metadata(data_dir=folder, features=_features(SCHEMA), split_infos=[split],
                                       filename_template=TEMPLATE, check_data=False,
                                       disable_shuffling=True, version="1.0.0")
    manifest = {"source": source, "rows": sum(shard_lengths), "skipped_count": len(skipped),
                "skipped": skipped, "lengths": [n for r in results for n in r["lengths"]],
                "items": [n for r in results for n in r["items"]]}
    write_json(folder / "manifest.json", manifest)
    if verbose:
        for line in skipped[:20]:
            print(f"skipped {line}")
        more = f" (the first 20 above; all in {folder / 'manifest.json'})" if len(skipped) > 20 else ""
        print(f"{folder}: {manifest['rows']} conversations built, {len(skipped)} skipped{more}")
    return manifest


class JsonItems:
    """(n, item) of an instruction JSON file (:func:`iter_json_list`), with ``position``: the
    bytes of the file read so far (for the build's progress)."""

    def __init__(self, path):
        self.path, self.position = Path(path), 0

    def __iter__(self):
        f = open(self.path, "rb")
        for pair in iter_json_list(self.path, opened=f):
            self.position = f.tell()
            yield pair


class InstructData:
    """A finished build as a read-only sequence: ``data[i]`` is the i-th kept row (``id``,
    ``image`` bytes (empty for text-only rows), ``roles``, ``texts`` and its source item
    ``order``), read from the array_record files on access; ``lengths`` [N] its rows' token
    counts, ``skipped`` the lines of the rows left out and ``digest`` a key of which source items
    were kept with which lengths (equal builds, equal digests)."""

    def __init__(self, folder):
        import numpy as np
        import tensorflow_datasets as tfds

        self.folder = Path(folder)
        manifest = json.loads((self.folder / "manifest.json").read_text())
        self.lengths = np.asarray(manifest["lengths"], np.int64)
        self.skipped = manifest["skipped"]
        self.digest = hashlib.sha256(json.dumps([manifest["items"], manifest["lengths"]]).encode()
                                     ).hexdigest()[:16]
        self.source = tfds.builder_from_directory(str(self.folder)).as_data_source(split="train")
        if len(self.source) != len(self.lengths):
            raise InstructError(f"{self.folder}: {len(self.source)} rows but the manifest has "
                                f"{len(self.lengths)} lengths: build it again (delete the folder)")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return _decode(self.source[int(i)], {**SCHEMA, "order": "int"})


def built(folder, source: dict) -> bool:
    """Whether ``folder`` holds a finished build of ``source``."""
    manifest = Path(folder) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("source") == source
    except (ValueError, OSError):
        return False


def instruct_folder(data_dir, name: str, source: dict, spec: Optional[TokenSpec]) -> Path:
    """Where the build of ``source`` tokenized by ``spec`` lives: a folder of its own per
    :func:`build_key`, so builds for two tokenizers sharing a data_dir do not replace each
    other."""
    return Path(data_dir) / "local_records" / f"instruct_{name}_{build_key(source, spec)}"


def build_json(path, image_folder, folder, source: dict, spec: Optional[TokenSpec], workers: int,
               shard_rows: int = 1000, verbose: bool = True) -> dict:
    """:func:`build` of an instruction JSON file (images relative to ``image_folder``, default
    the file's folder); returns the manifest."""
    path = Path(path)
    if not path.is_file():
        raise InstructError(f"{path}: instruction file not found")
    return build(JsonItems(path), folder, source, str(path), image_folder or path.parent, spec,
                 workers, shard_rows, path.stat().st_size, verbose)


def build_records(records: list, folder, source: dict, spec: Optional[TokenSpec],
                  verbose: bool = True) -> dict:
    """:func:`build` of records made in memory (the embedded set: dicts in :data:`SCHEMA`), in
    this process; returns the manifest."""
    items = [(n, Record(rec)) for n, rec in enumerate(records, start=1)]
    return build(iter(items), folder, source, "embedded", "", spec, 0, max(len(items), 1),
                 verbose=verbose)
