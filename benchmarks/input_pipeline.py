"""Input pipeline: the images / s train.py's batches sustain per host core, and the share of a
training run's step time spent waiting for them, with the prefetch (vitsink_jax.data.prefetch)
on and off, on the mini-study recipe (configs/mini_study.py: its DIYSink stage, the embedded
instruction set, 16 rows of 168 px DINOv2 input per step).

(a) Loader alone: ``train_data.Batches`` of that data (read from the tfds array_record builder,
decode, resize, normalise, tokenize, pad) produced by 1 and by 2 threads, no model step. Per
core: images / s over the threads that run (at most the host's cores), and images per second
of process CPU time (what one fully busy core sustains: hosts need about images / s of the
accelerators over that many cores).

(b) In training: short train.py runs of the stage, prefetch on (``data.prefetch=2``) and off
(``0``), taking turns; from metrics.jsonl, the per-step ``data_wait_s`` over the wall time
between the logged steps (the first step, which compiles, left out).

    python benchmarks/input_pipeline.py            # writes "input_pipeline" in results.json
    python benchmarks/input_pipeline.py --quick    # small model and data, 4 steps (the test suite)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

def recipe_config(quick: bool, steps: int):
    """The mini-study config of its DIYSink stage (``steps`` steps, one checkpoint at the end);
    with ``quick`` 48 records in 8-row batches."""
    import train
    from configs.mini_study import get_config

    cfg = get_config()
    _, overrides = train.parse_run(cfg.recipe[1], Path("."))  # "diysink: diysink.enabled=True"
    with cfg.unlocked():
        del cfg["recipe"], cfg["publish"], cfg["publish_dir"]
    cfg.update_from_flattened_dict(overrides)
    cfg.steps, cfg.checkpoint_every = steps, 1000
    if quick:
        cfg.data.variants, cfg.data.image_size, cfg.batch_size = 1, 56, 8
    return cfg


def stand_in(cfg) -> tuple:
    """(a stand-in model holding the checkpoint's config: all the loader reads, its tokenizer)."""
    from vitsink_jax.config import config_from_hf
    from vitsink_jax.convert.folders import read_config
    from vitsink_jax.data.tokenizer import load_tokenizer

    return (SimpleNamespace(config=config_from_hf(read_config(cfg.checkpoint))),
            load_tokenizer(cfg.checkpoint))


def loader_rate(cfg, records, n: int, workers: int) -> dict:
    """Images / s (and per process-CPU second) of ``n`` batches made by ``workers`` threads."""
    from vitsink_jax.data.prefetch import Prefetch
    from vitsink_jax.train_data import Batches

    model, tok = stand_in(cfg)
    batches = Batches(records, model, tok, cfg)
    for _ in Prefetch(batches, range(n, n + 2), 0):      # warm-up: file reads, lazy imports
        pass
    wall, cpu = time.perf_counter(), time.process_time()
    with Prefetch(batches, range(n), 2 * workers, workers) as feed:
        images = sum(len(b["pixels"]) for b in feed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    busy = min(workers, len(os.sched_getaffinity(0)))
    return {"workers": workers, "batches": n, "images": images, "seconds": wall,
            "input_pixels": model.config.input_size,
            "images_per_s": images / wall, "images_per_s_per_core": images / wall / busy,
            "images_per_cpu_s": images / cpu}


def train_wait(cfg, work: Path, prefetch: int) -> dict:
    """A train.py run with ``data.prefetch=prefetch``: its data-wait share and step times."""
    from vitsink_jax.trainer import train

    cfg = cfg.copy_and_resolve_references()
    cfg.data.prefetch = prefetch
    train(cfg, work)
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    waits = [x["data_wait_s"] for x in lines[1:]]
    span = lines[-1]["time"] - lines[0]["time"]       # steps 1 .. last, each to its log line
    steps = sorted(b["time"] - a["time"] for a, b in zip(lines, lines[1:]))
    return {"prefetch": prefetch, "workers": cfg.data.workers, "steps": len(waits),
            "data_wait_share": sum(waits) / span, "median_step_s": steps[len(steps) // 2],
            "median_data_wait_s": sorted(waits)[len(waits) // 2],
            "prefetch_wait_share": json.loads((work / "train_summary.json").read_text())["data_wait_share"]}


def quick_checkpoint(folder: Path) -> Path:
    """benchmarks/forward.py's tiny HF LLaVA (28 px) with the embedded tokenizer: no 20 s of
    eager init, as the embedded model's first build takes without a compile cache."""
    from forward import SIZES, hf_llava
    from vitsink_jax.embedded import embedded_tokenizer

    s = {**SIZES["quick"], "vocab": 512}  # room for the tokenizer's merges
    hf_llava(s).save_pretrained(folder)
    embedded_tokenizer(s["vocab"]).save_pretrained(str(folder))
    return folder


def main(argv=None) -> dict:
    import shutil

    from forward import parse_args

    import jax
    from vitsink_jax import compile_cache
    from vitsink_jax.embedded import ensure_embedded_checkpoint
    from vitsink_jax.provenance import machine, merge_json, package_versions, write_json
    from vitsink_jax.train_data import load_data, token_spec

    args, _, repeats = parse_args(__doc__, argv, repeats=2,
                                  steps=dict(type=int, default=25, help="train steps per run"),
                                  batches=dict(type=int, default=40, help="loader batches"))
    steps, n = (4, 4) if args.quick else (args.steps, args.batches)
    compile_cache.enable("auto")   # as train.py does: the runs after the first load the program
    work = Path(tempfile.mkdtemp(prefix="input-pipeline-"))
    cfg = recipe_config(args.quick, steps)
    cfg.data.data_dir = str(work / "tfds")            # one instruction builder for every run
    cfg.checkpoint = str(quick_checkpoint(work / "ckpt") if args.quick else
                         ensure_embedded_checkpoint(work, cfg.embedded, cfg.seed))

    records = load_data(cfg, work, token_spec(cfg, *stand_in(cfg)))
    cores = len(os.sched_getaffinity(0))
    loader = [loader_rate(cfg, records, n, w) for w in (1, 2)]
    runs = {"on": [], "off": []}
    for r in range(repeats):                           # taking turns: a slow spell hits both
        for name, prefetch in (("on", 2), ("off", 0)):
            runs[name].append(train_wait(cfg, work / f"{name}{r}", prefetch))
    share, step_s = ({k: sorted(x[key] for x in v)[len(v) // 2] for k, v in runs.items()}
                     for key in ("data_wait_share", "median_step_s"))
    result = {"recipe": "configs/mini_study.py diysink stage" + (" (quick: tiny model)" if args.quick else ""),
              "batch_size": cfg.batch_size, "input_pixels": loader[0]["input_pixels"],
              "host_cores": cores, "loader": loader, "train_runs": runs,
              "data_wait_share": share, "median_step_s": step_s, "target_share": 0.05,
              "versions": package_versions(), "machine": machine(), "device": str(jax.devices()[0])}
    for x in loader:
        print(f"loader, {x['workers']} thread(s): {x['images_per_s']:.0f} images/s = "
              f"{x['images_per_s_per_core']:.0f} per core ({x['images_per_cpu_s']:.0f} per CPU-second)")
    print(f"train, {steps} steps of {cfg.batch_size} rows: data wait {100 * share['on']:.1f}% of "
          f"step time with prefetch, {100 * share['off']:.1f}% without (target < 5%); median step "
          f"{step_s['on']:.2f} s with, {step_s['off']:.2f} s without")
    if args.out:
        write_json(args.out, result)
    if not args.quick:
        merge_json(ROOT / "benchmarks" / "results.json", "input_pipeline", result)
    shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
