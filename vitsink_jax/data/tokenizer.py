"""Tokenizers: the checkpoint's own Hugging Face tokenizer, or, for the embedded default model,
a small byte-level BPE trained offline on the embedded benchmark's text (so real words come out
of the logit lens and every prompt encodes without a download).

Prompts are built from a template with an ``<image>`` placeholder that expands as the model
family's processor expands it (:class:`~vitsink_jax.data.prompts.ImageSlots`: LLaVA's image
tokens, Gemma 3's ``\n\n<boi>`` image tokens ``<eoi>\n\n``).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .prompts import ImageSlots

IMAGE_PLACEHOLDER = "<image>"
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def load_tokenizer(path):
    """The tokenizer saved next to a checkpoint (tokenizer.json / tokenizer.model / vocab files),
    as ``AutoTokenizer.from_pretrained(path, local_files_only=True)`` loads it (its class
    remembered per file content when :mod:`vitsink_jax.resolved` is on: the CLIs); None when
    the folder has none."""
    from .. import resolved

    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json",
                                               "tokenizer_config.json")):
        return None
    return resolved.tokenizer(path)


def train_embedded_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE with exactly ``vocab_size`` ids; ``<image>`` is the last id.

    Ids 0-3 are ``<unk> <s> </s> <pad>``; unused ids up to ``vocab_size - 2`` are filled with
    ``<extra_i>`` tokens so the id of ``<image>`` is fixed by the vocabulary size alone.
    Returns a transformers ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(sorted(set(corpus)), trainer)
    n = bpe.get_vocab_size()
    if n > vocab_size - 1:
        raise ValueError(f"BPE vocabulary {n} exceeds {vocab_size - 1}")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens":
                            [f"<extra_{i}>" for i in range(vocab_size - 1 - n)] + [IMAGE_PLACEHOLDER]})
    tok.add_bos_token = True  # it starts every text with <s> itself, as LLaMA's does
    assert tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER) == vocab_size - 1 == len(tok) - 1
    return tok


_ADDS_BOS = weakref.WeakKeyDictionary()  # tokenizer -> adds_bos(tokenizer)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding starts a text with its BOS: LLaMA's and Gemma's do,
    Qwen2's has no BOS, Phi-2's names ``<|endoftext|>`` its BOS but never adds it. Prompts get a
    BOS exactly then, as LLaVA's and TinyLLaVA's ``tokenizer_image_token`` keep only a BOS the
    tokenizer added."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids if bos is not None else []
    out = bool(ids) and ids[0] == bos
    try:
        _ADDS_BOS[tokenizer] = out
    except TypeError:  # not weakly referable: asked again next time
        pass
    return out


def encode_prompt(tokenizer, text: str, image: ImageSlots, tiles: Sequence[int] = ()) -> np.ndarray:
    """[T] int32 ids of ``text`` with BOS first (when the tokenizer adds one: :func:`adds_bos`)
    and each ``<image>`` expanded as ``image`` says
    (the family's processor: :func:`vitsink_jax.data.prompts.prompt_format`); ``tiles``: the
    tiles of each image in order (InternVL; default one each)."""
    return encode_marked(tokenizer, text, image, tiles=tiles)[0]


def encode_marked(tokenizer, text: str, image: ImageSlots, *span_sets, tiles: Sequence[int] = ()) -> tuple:
    """:func:`encode_prompt` plus one token mask per set of character spans of ``text``.

    Each span set is a list of (start, end) character offsets into ``text``; its mask [T] bool
    is True at the tokens that overlap one of them (read from the tokenizer's offsets, so the
    text is tokenized exactly once, as :func:`encode_prompt` does; needs a fast tokenizer when
    spans are given). BOS, the image's ids and the text an image adds around itself
    (``image.text_before`` / ``text_after``, tokenized with their neighbours as the processor
    tokenizes them) are in no span. Training marks answers and the question this way
    (:func:`vitsink_jax.data.instruct.tokenize_conversation`), evaluation the question of its
    prompts, so DIYSink's ReW reads the same tokens in both.
    Returns (ids [T] int32, mask [T] bool per span set).
    """
    ids = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    masks = [[False] * len(ids) for _ in span_sets]
    pieces = text.split(IMAGE_PLACEHOLDER)
    if tiles and len(tiles) != len(pieces) - 1:
        raise ValueError(f"{len(tiles)} tile counts for {len(pieces) - 1} {IMAGE_PLACEHOLDER} in the prompt")
    start = 0
    for i, piece in enumerate(pieces):
        if i:
            slots = image.ids(tiles[i - 1] if tiles else 1)
            ids += slots
            for m in masks:
                m += [False] * len(slots)
            start += len(IMAGE_PLACEHOLDER)
        lead = image.text_after if i else ""
        tail = image.text_before if i < len(pieces) - 1 else ""
        full = lead + piece + tail
        if full and not span_sets:
            ids += tokenizer.encode(full, add_special_tokens=False)
        elif full:
            enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
                a, b = a - len(lead), max(b, a + 1) - len(lead)  # offsets into the piece
                if tail:
                    b = min(b, len(piece))
                a, b = max(a, 0) + start, b + start
                ids.append(tok)
                for m, spans in zip(masks, span_sets):
                    m.append(a < b and any(a < e and s < b for s, e in spans))
        start += len(piece)
    return (np.asarray(ids, np.int32), *(np.asarray(m, bool) for m in masks))
