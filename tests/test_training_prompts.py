"""Training rows as LLaVA-1.5's and TinyLLaVA's trainers build them (issue 33): stage 1 in the
"plain" pre-training format, ``<image>`` moved to the start of its turn, a leading "gpt" turn
dropped, rows cut at model_max_length after the image is expanded.

The reference is LLaVA's own preprocessing (llava/train/train.py: ``tokenizer_image_token``,
``preprocess_multimodal``, ``preprocess_plain``, ``preprocess_v1`` and conv_vicuna_v1's prompt),
restated below as the few lines that decide the ids, on a LLaMA-layout tokenizer; the ids of
one short caption are also written out as numbers."""

import json

import numpy as np
import pytest

from vitsink_jax.data import instruct_build as B
from vitsink_jax.data.instruct import image_first, tokenize_conversation
from vitsink_jax.data.prompts import CHATS, SYSTEMS, ImageSlots, PromptFormat
from vitsink_jax.embedded import embedded_config, embedded_shape

IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX
VICUNA_V1 = SYSTEMS["tinyllava"]  # conv_vicuna_v1.system, TinyLLaVA's templates' too
CORPUS = ["A chat between a curious user and an artificial intelligence assistant.",
          "USER: What is in the photo? ASSISTANT: A brown dog on the grass.",
          "Describe the image briefly. A cat sleeping on a red sofa near a window."]


def llava_image_tokens(prompt: str, tok) -> list:
    """LLaVA's ``tokenizer_image_token``: each chunk between ``<image>`` tokenized on its own
    (BOS kept once, at the start), IMAGE between them."""
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id else 0
    ids = [chunks[0][0]] if offset else []
    for i, chunk in enumerate(chunks):
        ids += ([IMAGE] if i else []) + chunk[offset:]
    return ids


def llava_plain(turns: list, tok) -> tuple[list, list]:
    """(ids, supervised) of ``preprocess_plain``: ``<image>`` + caption + "\\n", the first
    ``len(tokenizer_image_token("<image>"))`` labels ignored."""
    ids = llava_image_tokens("<image>" + turns[1]["value"] + "\n", tok)
    masked = len(llava_image_tokens("<image>", tok))
    return ids, [i >= masked for i in range(len(ids))]


def llava_v1(turns: list, tok) -> list:
    """Ids of ``preprocess_multimodal`` + ``preprocess_v1`` (conv_vicuna_v1): a first turn
    from gpt dropped, ``<image>`` first in its turn, ``system + " " + "USER: q ASSISTANT: a</s>"...``."""
    if turns[0]["from"] == "gpt":
        turns = turns[1:]
    prompt = VICUNA_V1 + " "
    for t in turns:
        value = image_first(t["value"])
        prompt += f"USER: {value} " if t["from"] == "human" else f"ASSISTANT: {value}</s>"
    return llava_image_tokens(prompt, tok)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(tokenizer, prompt format with 3 image tokens) of a tiny LLaMA-layout checkpoint whose
    tokenizer adds BOS itself, as Vicuna's does."""
    from conftest import hf_tokenizer

    tok = hf_tokenizer("llama", tmp_path_factory.mktemp("tok"), CORPUS)
    assert tok("A cat").input_ids[0] == tok.bos_token_id
    fmt = PromptFormat(CHATS["llava"], ImageSlots(3, tok.convert_tokens_to_ids("<image>")))
    return tok, fmt, fmt.image.ids(1)


def ours(tok, fmt, turns, **kw):
    """Our row of a JSON conversation (parsed as the build parses it, one image token)."""
    roles, texts = B.conversation_turns(turns)
    ids, loss, _ = tokenize_conversation(tok, roles, texts, fmt, **kw)
    n = len(fmt.image.ids(1))
    keep = np.ones(len(ids), bool)
    first = int(np.argmax(ids == fmt.image.token)) if (ids == fmt.image.token).any() else None
    if first is not None:
        keep[first + 1:first + n] = False  # the image's tokens as LLaVA's one IMAGE id
    return [IMAGE if i == fmt.image.token else int(i) for i in ids[keep]], loss[keep].tolist()


def test_stage1_rows_are_llava_plain(llama):
    """Stage 1 (data.template=plain / auto in pretrain): ``<image>`` + caption + newline, the loss
    on the caption and the newline: LLaVA's ids and labels, 7 tokens here against 82 for the same
    item in the chat template with the system prompt."""
    tok, fmt, _ = llama
    turns = [{"from": "human", "value": "Describe the image briefly.\n<image>"},
             {"from": "gpt", "value": "A cat sleeping."}]
    ids, loss = ours(tok, fmt, turns, template="plain")
    want_ids, want_loss = llava_plain(turns, tok)
    assert ids == want_ids and loss == want_loss
    assert ids == [1, IMAGE, 305, 399, 432, 259, 13]                 # written out

    chat, _ = ours(tok, fmt, turns, system="tinyllava")
    assert (len(ids), len(chat)) == (7, 82)
    with pytest.raises(ValueError, match="plain pre-training format takes one human turn"):
        ours(tok, fmt, turns + turns, template="plain")


def test_stage2_rows_are_llava_v1(llama):
    """Stage 2: a first turn from gpt is dropped, ``<image>`` moves to the start of its turn,
    the vicuna_v1 system prompt comes first: LLaVA's ids. Without data.image_first the JSON's
    position stays (another row)."""
    tok, fmt, _ = llama
    turns = [{"from": "gpt", "value": "Hello."},
             {"from": "human", "value": "What is in the photo?\n<image>"},
             {"from": "gpt", "value": "A brown dog."},
             {"from": "human", "value": "On what?"}, {"from": "gpt", "value": "The grass."}]
    ids, _ = ours(tok, fmt, turns, system="tinyllava", move_image_first=True)
    assert ids == llava_v1(turns, tok)
    kept, _ = ours(tok, fmt, turns, system="tinyllava")
    assert kept != ids and kept.index(IMAGE) > ids.index(IMAGE)
    with pytest.raises(ValueError, match="only one turn, from 'gpt'"):
        B.conversation_turns(turns[:1])


def test_a_row_past_model_max_length_is_cut_there(tmp_path, llama):
    """A ~3,000-token row under the recipes' data.max_length=2048 / too_long=truncate: built
    with length 2048, and train_data.Batches gives its first 2048 tokens (image expanded)."""
    from types import SimpleNamespace

    from vitsink_jax import train_data

    tok, fmt, _ = llama
    answer = " ".join(["A brown dog on the grass."] * 500)
    items = [{"id": "long", "conversations": [{"from": "human", "value": "What is in the photo?"},
                                              {"from": "gpt", "value": answer}]}]
    (tmp_path / "d.json").write_text(json.dumps(items))
    spec = B.TokenSpec(tok, fmt, max_length=2048, too_long="truncate")
    full = spec.tokenize(["human", "gpt"], ["What is in the photo?", answer])
    assert len(full[0]) > 3000
    manifest = B.build_json(tmp_path / "d.json", None, tmp_path / "b", {}, spec, 0, verbose=False)
    assert manifest["lengths"] == [2048]
    cfg = SimpleNamespace(batch_size=1, length_bucket=1, seed=0)
    model = SimpleNamespace(config=embedded_config(embedded_shape()))  # its pixel shape
    batch = train_data.Batches(B.InstructData(tmp_path / "b"), model, tok, cfg, spec=spec)(0)
    np.testing.assert_array_equal(batch["ids"][0], full[0][:2048])
    np.testing.assert_array_equal(batch["loss_mask"][0], full[1][:2048])


def test_a_bos_only_when_the_tokenizer_adds_one(tmp_path, llama):
    """Phi-2's tokenizer names ``<|endoftext|>`` its BOS but never adds it: its rows start with
    the text (as TinyLLaVA's ``tokenizer_image_token`` gives them), a LLaMA tokenizer's with
    its BOS."""
    import transformers
    from conftest import hf_tokenizer

    from vitsink_jax.data.tokenizer import adds_bos

    qwen = hf_tokenizer("qwen2", tmp_path / "q", CORPUS)
    model = json.loads(qwen.backend_tokenizer.to_str())["model"]
    phi = transformers.CodeGenTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    phi.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert phi.bos_token == "<|endoftext|>" and phi.bos_token_id is not None
    fmt = PromptFormat(CHATS["llava"], ImageSlots(3, phi.convert_tokens_to_ids("<image>")))
    turns = [{"from": "human", "value": "<image>\nWhat is in the photo?"},
             {"from": "gpt", "value": "A brown dog."}]
    ids, _ = ours(phi, fmt, turns)
    assert not adds_bos(phi) and ids[0] != phi.bos_token_id
    assert ids == llava_image_tokens("USER: <image>\nWhat is in the photo? ASSISTANT: A brown dog."
                                     + phi.eos_token, phi)
    tok, fmt, _ = llama
    assert adds_bos(tok) and ours(tok, fmt, turns)[0][0] == tok.bos_token_id
