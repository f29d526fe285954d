"""Training batches: how rows are tokenized (:func:`token_spec`), the instruction data built once
per source and tokenization (:func:`load_data`), and global batch k of a run as a pure function
of (seed, k) with each process's rows of it (:class:`Batches`).

Used by :mod:`vitsink_jax.trainer`; :mod:`vitsink_jax.data.prefetch` computes the batches ahead.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import jax
import numpy as np

from . import parallel, paths
from .data import instruct, instruct_build
from .data.preprocess import pixels_from_bytes
from .data.prompts import prompt_format
from .scores import file_sha256


def token_spec(cfg, model, tokenizer) -> instruct_build.TokenSpec:
    """How training rows are tokenized: the model's prompt format, ``data.system``, the length
    limit (``data.max_length``, 0: the LLM's positions) with ``data.too_long``, the template
    (``data.template``: "chat", "plain", or "auto": LLaVA's plain format in the pretrain stage,
    as LLaVA-1.5 and TinyLLaVA pre-train, the chat markup otherwise) and ``data.image_first``."""
    d = cfg.data
    limit = d.max_length or model.config.text.max_position_embeddings
    template = d.template if d.template != "auto" else (
        "plain" if cfg.stage == "pretrain" else "chat")
    fmt = prompt_format(model.config, tokenizer)
    image = len(fmt.image.ids(1))
    if limit <= image:  # a cut inside the image's tokens would leave the row unusable
        raise SystemExit(f"error: --config.data.max_length={limit} leaves no room after the image's "
                         f"{image} tokens")
    return instruct_build.TokenSpec(tokenizer, fmt, d.get("system", ""), limit, d.too_long,
                                    template, d.image_first)


def load_data(cfg, workdir: Path, spec: instruct_build.TokenSpec, json_sha256: str | None = None):
    """The instruction rows by index with their token lengths (``instruct_build.InstructData``:
    read on access), built once per source and tokenization (:mod:`vitsink_jax.data.instruct_build`:
    streamed, by ``data.build_workers`` processes, resumable). With several processes: when
    ``data.shared_fs`` says the data_dir is seen by every host, process 0 builds and the others
    read its build; otherwise every process builds its own copy of all rows in a folder of its
    own (hosts share no filesystem), so any host can read any row of a global batch.
    ``json_sha256``: the JSON file's hash when the caller has it already (:func:`run_settings`)."""
    d = cfg.data
    data_dir = paths.data_dir(d.data_dir, workdir, "data.data_dir")
    shared = jax.process_count() > 1 and d.shared_fs
    if not shared:
        data_dir = parallel.process_local(data_dir)
    name = Path(d.json).stem if d.json else "embedded"
    source = ({"json_sha256": json_sha256 or file_sha256(d.json), "image_folder": str(d.image_folder)}
              if d.json else {"embedded": [cfg.seed + 1000, d.variants, d.image_size, d.mc_format]})
    folder = instruct_build.instruct_folder(data_dir, name, source, spec)
    if jax.process_count() > 1 and jax.process_index() == 0:
        print(f"data: process 0 builds {folder} for every host (data.shared_fs)" if shared else
              "data: every process builds its own copy of the rows (data.shared_fs=False)")
    builds = not shared or jax.process_index() == 0
    if builds and not instruct_build.built(folder, source):
        verbose = jax.process_index() == 0 or not shared
        if d.json:
            instruct_build.build_json(d.json, d.image_folder or None, folder, source, spec,
                                      d.build_workers, d.shard_rows, verbose)
        else:
            records = instruct.embedded_instruct(cfg.seed + 1000, d.variants, d.image_size, d.mc_format)
            instruct_build.build_records(records, folder, source, spec, verbose=False)
    if shared:  # the others wait for the build by polling the shared folder, not in a collective
        while not instruct_build.built(folder, source):
            time.sleep(10)
        parallel.sync("instruction data built")
    data = instruct_build.InstructData(folder)
    if not shared:  # every copy must hold the same rows: the batches index them alike
        digests = parallel.allgather_objects(data.digest)
        if len(set(digests)) > 1:
            raise SystemExit(f"error: the hosts built different instruction data (rows / lengths "
                             f"digests {digests}): some host reads other files; see each host's "
                             f"{folder}/manifest.json for its skipped rows")
    return data


class Batches:
    """This process's rows of global batch k. Global batch k is the records
    ``instruct.batch_indices`` picks for k out of all of them, a function of (seed, k) alone,
    so a run resumed on another number of hosts continues with the same rows; process p
    supplies its contiguous slice of it (``parallel.process_rows``), padded to the longest row
    of the whole global batch (read from the build's manifest: no process tokenizes another's
    rows), so every process passes arrays of one shape (and as a one-process run would). A row
    longer than the limit (``data.too_long=truncate``) keeps its first ``max_length`` tokens, as
    LLaVA truncates to ``model_max_length``. A text-only row gets blank pixels and
    ``has_image`` False. Safe to call from several threads at once
    (``vitsink_jax.data.prefetch``); the tokenizer serves one at a time (a Rust-backed fast
    tokenizer may refuse concurrent calls: "Already borrowed")."""

    def __init__(self, records, model, tokenizer, cfg, process_index=None, process_count=None,
                 spec=None):
        self.records, self.model, self.tok, self.cfg = records, model, tokenizer, cfg
        self.spec = spec or token_spec(cfg, model, tokenizer)
        if cfg.batch_size > len(records):
            raise SystemExit(f"error: batch_size {cfg.batch_size} is larger than the "
                             f"{len(records)} training records")
        self.rows = parallel.process_rows(cfg.batch_size, process_index, process_count)
        self.tokenizing = threading.Lock()
        self.blank = None  # pixels of a text-only row (zeros, as LLaVA's), made once
        aspect = getattr(getattr(cfg, "data", None), "image_aspect_ratio", "auto")
        self.aspect = None if aspect == "auto" else aspect  # None: the checkpoint's own

    def example(self, record) -> dict:
        """A record tokenized (ids, loss_mask, question_mask), cut to the length limit."""
        with self.tokenizing:
            ids, loss_mask, question_mask = self.spec.tokenize(record["roles"], record["texts"])
        keep = slice(0, self.spec.max_length or None)
        return {"ids": ids[keep], "loss_mask": loss_mask[keep], "question_mask": question_mask[keep]}

    def pixels(self, record) -> np.ndarray:
        if record["image"]:
            return pixels_from_bytes(self.model.config, record["image"], self.aspect)
        if self.blank is None:
            self.blank = np.zeros_like(pixels_from_bytes(self.model.config, blank_png()))
        return self.blank

    def indices(self, step: int) -> np.ndarray:
        """Record indices of global batch ``step`` (every process's rows, in order)."""
        # [seed, 0]: the stream of the single data shard of earlier versions, so one-process
        # runs keep their batches except where a batch straddling two epochs repeated a row
        # (the mini study's 600-step stages are unchanged; its ReW stage differs from step 86)
        return instruct.batch_indices(len(self.records), self.cfg.batch_size, step,
                                      [self.cfg.seed, 0])

    def __call__(self, step: int) -> dict:
        every = self.indices(step)
        rows = []
        for i in every[self.rows]:
            record = self.records[i]
            rows.append({**self.example(record), "pixels": self.pixels(record),
                         "has_image": bool(record["image"])})
        return instruct.pad_batch(rows, self.cfg.length_bucket, self.tok.pad_token_id or 0,
                                  longest=int(self.records.lengths[every].max()))


def blank_png() -> bytes:
    """A 1 x 1 PNG (its preprocessed shape is the model's pixel shape)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    return buf.getvalue()
