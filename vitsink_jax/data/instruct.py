"""LLaVA-format instruction data -> tfds builder -> tokenized, bucketed training batches.

LLaVA format: a JSON list of ``{"id", "image": path relative to the image folder,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."},
...]}``. Conversations are rendered in LLaVA-1.5's template (the one the benchmark prompts use)::

    <s>USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>

The loss covers the answer tokens and their ``</s>`` only; the question tokens (non-image tokens
of human turns) form the question mask that DIYSink's ReW reads. Token labels come from the
tokenizer's character offsets, so the text is tokenized exactly once, as a whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .padding import bucket, right_pad
from .prompts import ASSISTANT, TEMPLATES, USER, human_text
from .tfds_io import read_builder, write_builder
from .tokenizer import IMAGE_PLACEHOLDER, encode_marked

SCHEMA = {"id": "text", "image": "bytes", "roles": "text_list", "texts": "text_list"}
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class InstructError(ValueError):
    """An instruction file that cannot be used (the message names the file)."""


def read_llava_json(path, image_folder=None, verbose: bool = True) -> tuple[list, list]:
    """(records, skipped): records in :data:`SCHEMA`; a conversation without turns, with an
    unknown role or a missing image file is skipped with ``file:item N (id I): reason``."""
    path = Path(path)
    if not path.is_file():
        raise InstructError(f"{path}: instruction file not found")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InstructError(f"{path}: not valid JSON ({e})")
    if not isinstance(items, list) or not items:
        raise InstructError(f"{path}: expected a non-empty JSON list of conversations")
    folder = Path(image_folder) if image_folder else path.parent
    records, skipped = [], []
    for n, item in enumerate(items, start=1):
        try:
            turns = item.get("conversations") or []
            if not turns:
                raise ValueError("no 'conversations'")
            roles = [ROLES.get(t.get("from", "")) for t in turns]
            if None in roles:
                raise ValueError(f"unknown role in {[t.get('from') for t in turns]}")
            image = folder / str(item.get("image", ""))
            if not item.get("image") or not image.is_file():
                raise ValueError(f"image {image} not found")
            records.append({"id": str(item.get("id", n)), "image": image.read_bytes(),
                            "roles": roles, "texts": [str(t.get("value", "")) for t in turns]})
        except (ValueError, AttributeError) as e:
            skipped.append(f"{path}:item {n} (id {item.get('id', '?') if isinstance(item, dict) else '?'}): {e}")
            if verbose:
                print(f"skipping {skipped[-1]}")
    if not records:
        raise InstructError(f"{path}: all {len(items)} items were skipped")
    return records, skipped


def embedded_instruct(seed: int, variants: int, size: int, mc_format: str = "letter") -> list:
    """A small real training set without downloads: the embedded benchmark's generator (other
    seed, other overlays) as single-turn conversations in the benchmark's prompt format,
    answered with the option letter (or, ``mc_format="cloze"``, the option text)."""
    from ..eval_lib import answer_text, prompt_text
    from .synthetic import embedded_benchmark

    records = []
    for rec in embedded_benchmark(seed, variants, size):
        human = human_text(prompt_text(rec, TEMPLATES, mc_format))
        records.append({"id": rec["index"], "image": rec["image"], "roles": ["human", "gpt"],
                        "texts": [human, answer_text(rec, mc_format)]})
    return records


def write_instruct(records: list, name: str, data_dir) -> Path:
    return write_builder(records, f"instruct_{name}", data_dir, SCHEMA)


def read_instruct(name: str, data_dir, process_index: int = 0, process_count: int = 1) -> list:
    return read_builder(f"instruct_{name}", data_dir, SCHEMA, process_index, process_count)


def tokenize_conversation(tokenizer, roles: list, texts: list, num_image_tokens: int,
                          image_token_index: int):
    """(ids [T] int32, loss_mask [T] bool, question_mask [T] bool) of one conversation.

    The ``<image>`` placeholder expands to ``num_image_tokens`` image tokens (neither loss nor
    question); a conversation must hold exactly one placeholder.
    """
    eos = tokenizer.eos_token or ""
    text, answer_spans, question_spans = "", [], []
    for role, value in zip(roles, texts):
        if role == "human":
            text += USER
            question_spans.append((len(text), len(text) + len(value)))
            text += value + ASSISTANT
        else:
            text += " "
            answer_spans.append((len(text), len(text) + len(value) + len(eos)))
            text += value + eos
    if text.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"a conversation needs exactly one {IMAGE_PLACEHOLDER}; found "
                         f"{text.count(IMAGE_PLACEHOLDER)}")
    return encode_marked(tokenizer, text, num_image_tokens, image_token_index, answer_spans,
                         question_spans)


def pad_batch(examples: list, length_bucket: int, pad_id: int = 0) -> dict:
    """Tokenized examples (dicts with ids, loss_mask, question_mask, pixels) -> right-padded
    batch arrays; the length is rounded up to a multiple of ``length_bucket``."""
    length = bucket(max(len(e["ids"]) for e in examples), length_bucket)
    out = {}
    out["ids"], out["mask"] = right_pad([e["ids"] for e in examples], length, pad_id)
    for key in ("loss_mask", "question_mask"):
        out[key] = right_pad([np.asarray(e[key], bool) for e in examples], length, False)[0]
    out["pixels"] = np.stack([e["pixels"] for e in examples])
    return out


def batch_indices(n: int, batch_size: int, step: int, seed) -> np.ndarray:
    """Example indices of batch ``step``: a fresh seeded permutation every epoch, so the data
    position is the step alone and resuming at step k replays nothing and skips nothing.
    ``seed``: an int or a list of ints (e.g. [seed, shard])."""
    out = []
    pos = step * batch_size
    seed = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng(seed + [epoch]).permutation(n)
        take = perm[offset:offset + batch_size - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return np.asarray(out)
