"""LLaVA-format instruction data -> tokenized, bucketed training batches (the files are built by
:mod:`vitsink_jax.data.instruct_build`).

LLaVA format: a JSON list of ``{"id", "image": path relative to the image folder,
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."},
...]}`` (no ``image`` and no ``<image>``: a text-only conversation). Conversations are rendered in
LLaVA-1.5's template (the one the benchmark prompts use)::

    <s>USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: {answer}</s>

The loss covers the answer tokens (from the space after ``ASSISTANT:`` on: the first token an
evaluation prompt leaves the model to produce) and their ``</s>`` only; the question tokens
(non-image tokens of human turns) form the question mask that DIYSink's ReW reads. Token labels
come from the tokenizer's character offsets, so the text is tokenized exactly once, as a whole.
"""

from __future__ import annotations

import numpy as np

from .padding import bucket, right_pad
from .prompts import TEMPLATES, PromptFormat, answer_text, human_text, prompt_text, system_prefix
from .tokenizer import IMAGE_PLACEHOLDER, encode_marked

def embedded_instruct(seed: int, variants: int, size: int, mc_format: str = "letter") -> list:
    """A small real training set without downloads: the embedded benchmark's generator (other
    seed, other overlays) as single-turn conversations in the benchmark's prompt format,
    answered with the option letter (or, ``mc_format="cloze"``, the option text)."""
    from .synthetic import embedded_benchmark

    records = []
    for rec in embedded_benchmark(seed, variants, size):
        human = human_text(prompt_text(rec, TEMPLATES, mc_format))
        records.append({"id": rec["index"], "image": rec["image"], "roles": ["human", "gpt"],
                        "texts": [human, answer_text(rec, mc_format)]})
    return records


TEMPLATES_OF_TRAINING = ("chat", "plain")


def image_first(text: str) -> str:
    """A turn's ``<image>`` moved to its start, on a line of its own, as LLaVA's
    ``preprocess_multimodal`` (and TinyLLaVA's templates) write every training turn:
    ``"<image>\\n" + rest.strip()``, the whole stripped. Text without ``<image>`` is returned as is."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    return (IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()


def plain_text(roles: list, texts: list) -> tuple[str, list]:
    """(text, answer spans) of a caption pair in LLaVA's "plain" pre-training format
    (``preprocess_plain``, TinyLLaVA's pretrain template): the human turn becomes the image
    alone, followed by the caption and ``"\\n"``; the loss covers the caption and the newline."""
    if roles != ["human", "gpt"] or IMAGE_PLACEHOLDER not in texts[0]:
        raise ValueError("the plain pre-training format takes one human turn holding the image "
                         f"and one answer (the caption); this conversation has turns {roles}"
                         + ("" if IMAGE_PLACEHOLDER in texts[0] else " and no image in the first"))
    text = IMAGE_PLACEHOLDER + texts[1] + "\n"
    return text, [(len(IMAGE_PLACEHOLDER), len(text))]


def tokenize_conversation(tokenizer, roles: list, texts: list, fmt: PromptFormat, system: str = "",
                          template: str = "chat", move_image_first: bool = False):
    """(ids [T] int32, loss_mask [T] bool, question_mask [T] bool) of one conversation in the
    model's prompt format (:func:`~vitsink_jax.data.prompts.prompt_format`: its chat markup
    and image expansion; LLaVA's template is described here), or (``template="plain"``) in
    LLaVA's plain pre-training format (:func:`plain_text`; no question tokens).
    ``move_image_first``: each turn's ``<image>`` first (:func:`image_first`), as LLaVA and
    TinyLLaVA train; else where the text has it.

    The ``<image>`` placeholder expands to the image's tokens (neither loss nor question); a
    conversation holds one placeholder, or none (a text-only conversation, which LLaVA-1.5
    trains on with no image tokens).

    The loss covers every token that overlaps an answer, its ``</s>`` or the space between
    ``ASSISTANT:`` and the answer: the tokens a model must produce after a prompt that ends at
    ``ASSISTANT:``, which is where evaluation prompts end. A tokenizer that makes that space a
    token of its own (byte-level BPE's ``Ġ`` before a digit or an unmerged letter, LLaMA's
    ``▁`` before a digit) has it supervised, and the supervised tokens of an answer are the ones
    :func:`vitsink_jax.eval_lib.scoring_rows` scores for the same answer after the same prompt.
    ``system``: a system prompt before the first turn (:func:`~vitsink_jax.data.prompts.system_prefix`).
    """
    if template not in TEMPLATES_OF_TRAINING:
        raise ValueError(f"unknown training template {template!r}; choose one of {TEMPLATES_OF_TRAINING}")
    if move_image_first:
        texts = [image_first(t) for t in texts]
    if template == "plain":
        text, answer_spans = plain_text(roles, texts)
        return encode_marked(tokenizer, text, fmt.image, answer_spans, [])
    chat = fmt.chat
    end = (tokenizer.eos_token or "") if chat.end is None else chat.end
    if system and chat.name != "llava":
        raise ValueError(f"a system prompt is a LLaVA-template prefix; the {chat.name} chat "
                         "markup takes none here")
    text, answer_spans, question_spans = system_prefix(system), [], []
    for role, value in zip(roles, texts):
        if role == "human":
            value = chat.human(value)
            text += chat.user
            question_spans.append((len(text), len(text) + len(value)))
            text += value + chat.assistant
        else:  # the answer's span starts at the space after ASSISTANT: (see the docstring)
            answer_spans.append((len(text), len(text) + len(chat.answer_sep) + len(value) + len(end)))
            text += chat.answer_sep + value + end
    if text.count(IMAGE_PLACEHOLDER) > 1:
        raise ValueError(f"a conversation holds at most one {IMAGE_PLACEHOLDER}; found "
                         f"{text.count(IMAGE_PLACEHOLDER)}")
    return encode_marked(tokenizer, text, fmt.image, answer_spans, question_spans)


def pad_batch(examples: list, length_bucket: int, pad_id: int = 0, longest: int = 0) -> dict:
    """Tokenized examples (dicts with ids, loss_mask, question_mask, pixels and has_image) ->
    right-padded batch arrays; the length (the longest row, or ``longest`` when given: the
    longest row of the global batch, so that every host pads its rows alike) is rounded up to a
    multiple of ``length_bucket``. ``has_image`` [B] bool: False for a text-only row, whose
    ``pixels`` are a blank stand-in the model runs but never writes into the row."""
    length = bucket(longest or max(len(e["ids"]) for e in examples), length_bucket)
    out = {}
    out["ids"], out["mask"] = right_pad([e["ids"] for e in examples], length, pad_id)
    for key in ("loss_mask", "question_mask"):
        out[key] = right_pad([np.asarray(e[key], bool) for e in examples], length, False)[0]
    out["pixels"] = np.stack([e["pixels"] for e in examples])
    out["has_image"] = np.asarray([e["has_image"] for e in examples], bool)
    return out


def batch_indices(n: int, batch_size: int, step: int, seed) -> np.ndarray:
    """Record indices (of all ``n``) of global batch ``step``: the rows at positions
    [step x batch_size, (step + 1) x batch_size) of the stream of epoch orders
    (:func:`epoch_order`), so the batch is a function of (seed, step) alone: resuming at step
    k, on any number of hosts, replays nothing and skips nothing. Every row is seen once per
    epoch, and a batch never holds a row twice (``batch_size <= n``). ``seed``: an int or a
    list of ints."""
    if not 0 < batch_size <= n:
        raise ValueError(f"batch size {batch_size} must be between 1 and the {n} records")
    epoch, offset = divmod(step * batch_size, n)
    out = epoch_order(n, batch_size, epoch, seed)[offset:offset + batch_size]
    if len(out) < batch_size:  # the batch straddles two epochs
        out = np.concatenate([out, epoch_order(n, batch_size, epoch + 1, seed)[:batch_size - len(out)]])
    return out


_LAST_ORDER = {}  # (n, batch_size, seed) -> (epoch, its order): consecutive steps reuse it


def epoch_order(n: int, batch_size: int, epoch: int, seed) -> np.ndarray:
    """The order of the ``n`` records in ``epoch`` (read-only): the seeded permutation
    ``default_rng(seed + [epoch])``, except at the start of an epoch that a batch straddles:
    that batch ends epoch - 1 with its last ``t`` rows and takes its other ``batch_size - t``
    rows from the start of this order, so any of those that is among the ``t`` swaps places
    with the next rows of this order that are not (they move forward, it moves back). Each
    epoch stays a permutation (no row skipped or repeated), and the swaps touch the first
    ``batch_size`` positions only, so with ``n >= 2 x batch_size`` an epoch depends on the
    previous plain permutation alone (below that on the previous order, computed in turn)."""
    seed = tuple(seed) if isinstance(seed, (list, tuple)) else (seed,)
    key = (n, batch_size, seed)
    have, order = _LAST_ORDER.get(key, (None, None))
    if have == epoch:
        return order
    chained = n < 2 * batch_size
    if have is not None and (have == epoch - 1 or (chained and have < epoch)):
        start, prev = have + 1, order
    else:
        start, prev = (0 if chained else max(epoch - 1, 0)), None
    for e in range(start, epoch + 1):
        order = np.random.default_rng(list(seed) + [e]).permutation(n)
        tail = e * n % batch_size  # rows of epoch e - 1 in the batch that straddles into e
        if tail and prev is not None:
            head = batch_size - tail
            taken = np.isin(order, prev[n - tail:])
            dup = np.flatnonzero(taken[:head])
            free = head + np.flatnonzero(~taken[head:])[:len(dup)]
            order[dup], order[free] = order[free], order[dup]
        prev = order
    order.flags.writeable = False
    _LAST_ORDER[key] = (epoch, order)
    return order
