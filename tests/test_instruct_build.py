"""The streamed instruction-data build (vitsink_jax.data.instruct_build): the JSON read item by
item, bad rows skipped and named in the manifest, text-only conversations kept, each row's
token length recorded, a killed build continued from its last finished shard, and text-only
rows trained as LLaVA-1.5 trains them."""

import io
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vitsink_jax as vj
from vitsink_jax import train_lib
from vitsink_jax.data import instruct_build as B
from vitsink_jax.data.instruct import tokenize_conversation
from vitsink_jax.data.prompts import prompt_format
from vitsink_jax.embedded import embedded_config, embedded_shape, embedded_tokenizer

SMALL = dict(image_size=56, vision_hidden=48, vision_layers=2, text_hidden=64, text_layers=2,
             vocab_size=512)


def jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size[::-1] + (3,), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def turns(human: str, answer: str = "A cat.") -> list:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def small():
    """(config, tokenizer, TokenSpec) of the small embedded model."""
    e = embedded_shape()
    e.update(SMALL)
    config = embedded_config(e)
    tok = embedded_tokenizer(e.vocab_size)
    return config, tok, B.TokenSpec(tok, prompt_format(config, tok), max_length=200)


def test_the_json_list_is_read_item_by_item(tmp_path):
    """Items equal json.loads' whatever the chunk size (strings holding brackets, commas,
    escapes and non-ASCII cut across chunks; a UTF-8 BOM); what is not a JSON list is refused
    naming the file and the item."""
    items = [{"id": i, "t": f"a [b], {{c}} \"q\" \\ é 日本 {'x' * (i * 7)}", "n": [i, {"k": None}]}
             for i in range(30)]
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf \n" + json.dumps(items, indent=1, ensure_ascii=False).encode())
    for chunk in (3, 64, 1 << 20):
        got = list(B.iter_json_list(path, chunk_bytes=chunk))
        assert [n for n, _ in got] == list(range(1, 31)) and [x for _, x in got] == items, chunk
    path.write_text("[]")
    assert list(B.iter_json_list(path)) == []
    for text, match in (('{"a": 1}', "expected a JSON list"), ('[{"a": 1}, {"b": ', "in item 2"),
                        ('[{"a": 1} {"b": 2}]', "after item 1"), ('[1, 2', "after item 2 .* the file ends")):
        path.write_text(text)
        with pytest.raises(B.InstructError, match=match) as e:
            list(B.iter_json_list(path, chunk_bytes=4))
        assert str(path) in str(e.value)
    # a syntax error inside an item early in a long file is found there, not after reading the rest
    path.write_text('[{"a": 1}, {"b" 2}, ' + ", ".join(['{"c": "' + "x" * 50 + '"}'] * 5000) + "]")
    with pytest.raises(B.InstructError, match="in item 2"):
        list(B.iter_json_list(path, chunk_bytes=64, max_item=1000))


@pytest.mark.slow
def test_the_build_names_bad_rows_keeps_text_only_ones_and_records_lengths(tmp_path, small):
    """Two worker processes, shards of 3 items: every bad row is skipped and named by file:item
    and id in the manifest (the build goes on), a text-only conversation is kept with an empty
    image, and each row's length is the length training tokenizes it to."""
    config, tok, spec = small
    (tmp_path / "a.jpg").write_bytes(jpeg(0))
    (tmp_path / "b.jpg").write_bytes(jpeg(1))
    (tmp_path / "text.jpg").write_text("hello")
    items = [{"id": "good", "image": "a.jpg", "conversations": turns("<image>\nWhat is it?")},
             {"id": "chat", "conversations": turns("Tell me a joke.", "No.") + turns("Why?", "Because.")},
             {"id": "two", "image": "a.jpg", "conversations": turns("<image>\n<image>\nWhat?")},
             {"id": "gone", "image": "missing.jpg", "conversations": turns("<image>\nWhat?")},
             {"id": "text", "image": "text.jpg", "conversations": turns("<image>\nWhat?")},
             ["not", "a", "dict"],
             {"id": "long", "image": "b.jpg", "conversations": turns("<image>\n" + "word " * 400)},
             {"id": "loose", "conversations": turns("What is <image>?")},
             {"id": "good2", "image": "b.jpg", "conversations": turns("What is it?\n<image>", "A dog.")},
             {"id": "rec", "record": 1, "conversations": turns("Hi?", "Hello.")}]  # a plain item
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(items))
    source = {"json": str(path)}
    folder = B.instruct_folder(tmp_path / "tfds", "llava", source, spec)
    manifest = B.build_json(path, None, folder, source, spec, workers=2, shard_rows=3, verbose=False)
    assert manifest["rows"] == 4 and manifest["items"] == [1, 2, 9, 10]
    reasons = {line.split(" (id ")[1].split(")")[0]: line for line in manifest["skipped"]}
    assert sorted(reasons) == ["?", "gone", "long", "loose", "text", "two"]
    assert all(line.startswith(f"{path}:item ") for line in manifest["skipped"])
    assert "item 3 (id two): 2 <image> placeholders" in reasons["two"]
    assert f"image {tmp_path / 'missing.jpg'} not found" in reasons["gone"]
    assert "does not decode as an image" in reasons["text"]
    assert "item 6 (id ?): not a JSON object but list" in reasons["?"]
    assert "tokens, longer than the limit of 200" in reasons["long"]
    assert "1 <image> placeholders but no 'image'" in reasons["loose"]
    data = B.InstructData(folder)
    assert len(data) == 4 and [data[i]["id"] for i in range(4)] == ["good", "chat", "good2", "rec"]
    assert data[0]["image"] == jpeg(0) and data[1]["image"] == b"" and data[2]["order"] == 9
    for i in range(3):
        ids = tokenize_conversation(tok, data[i]["roles"], data[i]["texts"], spec.fmt)[0]
        assert data.lengths[i] == len(ids)
    assert (ids == config.image_token_index).sum() == config.num_image_tokens
    text_ids = tokenize_conversation(tok, data[1]["roles"], data[1]["texts"], spec.fmt)[0]
    assert not (text_ids == config.image_token_index).any()
    assert B.built(folder, source) and not B.built(folder, {"json": "other"})
    # truncation as LLaVA truncates to model_max_length: the long row is kept, cut to the limit
    cut = B.TokenSpec(tok, spec.fmt, max_length=200, too_long="truncate")
    other = B.instruct_folder(tmp_path / "tfds", "llava", source, cut)
    assert other != folder
    kept = B.build_json(path, None, other, source, cut, workers=0, shard_rows=3, verbose=False)
    assert kept["items"] == [1, 2, 7, 9, 10] and kept["lengths"][2] == 200


def test_a_killed_build_continues_from_its_last_finished_shard(tmp_path, small, capsys):
    """A build stopped in its third shard keeps the two finished ones (their files are not
    written again) and ends with the rows, lengths and manifest of a build never stopped."""
    _, _, spec = small
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
    items = [{"id": f"r{n}", "image": f"{n % 3}.jpg", "conversations": turns(f"<image>\nQ{n}?", f"A{n}.")}
             if n % 4 else {"id": f"r{n}", "conversations": turns(f"Q{n}?", f"A{n}.")} for n in range(10)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(items))
    source = {"json": str(path)}

    def stopped(limit):
        for n, item in B.JsonItems(path):
            if n > limit:
                raise KeyboardInterrupt
            yield n, item

    folder = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        B.build(stopped(7), folder, source, str(path), tmp_path, spec, 0, 3, verbose=False)
    assert sorted(p.name for p in (folder / "progress").glob("*.json")) == ["00000.json", "00001.json"]
    assert not (folder / "manifest.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("instruct-train*")}
    resumed = B.build(B.JsonItems(path), folder, source, str(path), tmp_path, spec, 0, 3)
    assert "continuing the build after 2 finished shard(s)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("instruct-train*")
            if p.name in before} == before
    straight = B.build(B.JsonItems(path), tmp_path / "straight", source, str(path), tmp_path, spec,
                       0, 3, verbose=False)
    assert resumed == straight and resumed["rows"] == 10
    a, b = B.InstructData(folder), B.InstructData(tmp_path / "straight")
    assert [a[i] for i in range(10)] == [b[i] for i in range(10)]


@pytest.mark.slow
def test_text_only_rows_train_as_if_alone(small):
    """A batch mixing image rows and text-only rows (blank pixels, has_image False): the summed
    answer NLL equals the sum of each row's own, the image rows run with their image and the
    text-only rows as plain text (no pixels at all), as LLaVA-1.5 trains them."""
    config, tok, spec = small
    model = vj.build_model(config)
    params = jax.jit(lambda key: vj.init_params(model, key))(jax.random.PRNGKey(3))
    photo = [{"roles": ["human", "gpt"], "texts": ["<image>\nWhat is it?", "A cat."]},
             {"roles": ["human", "gpt", "human", "gpt"], "texts": ["Hi?", "Hello there.", "And?", "Bye."]},
             {"roles": ["human", "gpt"], "texts": ["Where?\n<image>", "On a mat."]},
             {"roles": ["human", "gpt"], "texts": ["Count to three.", "One two three."]}]
    rows = [tokenize_conversation(tok, r["roles"], r["texts"], spec.fmt) for r in photo]
    t = max(len(r[0]) for r in rows)
    pad = lambda x, v: np.pad(x, (0, t - len(x)), constant_values=v)  # noqa: E731
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((4, 3, config.vision.image_size, config.vision.image_size)).astype(np.float32)
    has_image = np.array([True, False, True, False])
    pixels[~has_image] = 0.0
    batch = {"ids": np.stack([pad(r[0], 0) for r in rows]),
             "mask": np.stack([pad(np.ones(len(r[0]), np.int32), 0) for r in rows]),
             "loss_mask": np.stack([pad(r[1], False) for r in rows]),
             "question_mask": np.stack([pad(r[2], False) for r in rows]),
             "pixels": pixels, "has_image": has_image}
    mixed = float(jax.jit(train_lib.loss_fn(model, "finetune"))(params, {}, batch, 1))
    apply = jax.jit(model.apply)
    alone = 0.0
    for i in range(4):  # each row alone (right padding: one shape per kind of row)
        one = {k: v[i:i + 1] for k, v in batch.items()}
        out = apply({"params": params}, one["ids"], one["pixels"] if has_image[i] else None,
                    attention_mask=one["mask"])
        alone += float(train_lib.answer_nll_sum(out.logits, jnp.asarray(one["ids"]), one["loss_mask"]))
    np.testing.assert_allclose(mixed, alone, rtol=1e-5)


def test_training_rows_of_the_build_read_their_lengths_from_the_manifest(tmp_path, small,
                                                                        monkeypatch):
    """train_data.Batches pads a global batch to its longest row from the manifest: no row of
    another process is tokenized (a process of 2 tokenizes its own 4 rows of 8)."""
    from vitsink_jax import train_data
    from vitsink_jax.data import instruct

    config, tok, spec = small
    (tmp_path / "a.jpg").write_bytes(jpeg(0))
    items = [{"id": f"r{n}", "image": "a.jpg", "conversations": turns("<image>\nQ?", "A" * (n + 1))}
             if n % 2 else {"id": f"r{n}", "conversations": turns("Q" * n, "A.")} for n in range(12)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(items))
    folder = tmp_path / "built"
    B.build_json(path, None, folder, {"json": "d"}, spec, workers=0, shard_rows=5, verbose=False)
    data = B.InstructData(folder)
    cfg = SimpleNamespace(batch_size=8, length_bucket=1, seed=0)
    calls = []
    real = instruct.tokenize_conversation
    monkeypatch.setattr(instruct, "tokenize_conversation", lambda *a, **k: calls.append(1) or real(*a, **k))
    batches = train_data.Batches(data, SimpleNamespace(config=config), tok, cfg, 1, 2, spec=spec)
    batch = batches(0)
    assert len(calls) == 4
    every = batches.indices(0)
    assert batch["ids"].shape == (4, int(data.lengths[every].max()))
    assert batch["has_image"].tolist() == [bool(data[i]["image"]) for i in every[4:]]
    assert not batch["pixels"][~batch["has_image"]].any()


@pytest.mark.slow
def test_a_resume_on_rows_built_otherwise_is_refused(tmp_path):
    """A run resumed after its data was built again with other rows kept (an image that no longer
    decodes, same file, same settings) is refused naming the data, instead of training on
    another batch stream; --config.resume_changes=allow goes on and records it."""
    import shutil

    from test_train import config
    from vitsink_jax import trainer

    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
    items = [{"id": f"r{i}", "image": f"{i}.jpg", "conversations": turns("<image>\nWhat?", f"A{i}.")}
             for i in range(6)]
    (tmp_path / "d.json").write_text(json.dumps(items))
    kw = {"data.json": str(tmp_path / "d.json"), "batch_size": 2, "steps": 2, "checkpoint_every": 1,
          "data.build_workers": 0}
    trainer.train(config(**kw), tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "tfds")
    (tmp_path / "3.jpg").write_text("not an image any more")
    with pytest.raises(SystemExit, match="trained on other rows"):
        trainer.train(config(**{**kw, "steps": 3}), tmp_path / "run")
    summary = trainer.train(config(**{**kw, "steps": 3, "resume_changes": "allow"}), tmp_path / "run")
    assert any("kept rows" in c for c in summary["resume_changes"])
