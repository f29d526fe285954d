"""Compile time paid once: process start -> first train step (train.py) and process start ->
first scored batch written (evaluate.py benchmark mode), first with an empty persistent
compilation cache, then again with the cache the first run filled, against a Hugging Face
PyTorch script doing the same from process start (load the checkpoint, one AdamW step with SDPA
attention / one forward), on the same medium LLaVA checkpoint, in one run.

Ours includes what the CLIs do before (reading the config, writing the instruction / benchmark
tfds builder, the checkpoint hash, sharding the state) and, for evaluate.py, writing the results
and exiting; the HF scripts feed random ids of the same shape. Each contender runs ``--repeats``
times, taking turns; medians. One more warm train.py run under cProfile gives where its start
goes (``profile_warm_train``: imports, loading, the first step).

    python benchmarks/startup.py            # medium config
    python benchmarks/startup.py --quick    # tiny config, one repeat (the test suite)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def hf_child(kind: str, ckpt: str, batch: int, length: int) -> None:
    """The HF contender (its own process): load, then one training step (AdamW, fused where
    torch has it) or one forward; prints the wall-clock time when it is done."""
    import torch
    import transformers

    model = transformers.LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="sdpa")
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = torch.randint(3, cfg.text_config.vocab_size - 2, (batch, length + n_img))
    ids[:, 4:4 + n_img] = cfg.image_token_index
    pixels = torch.randn(batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    if kind == "train":
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                fused=True)
        model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
        opt.step()
    else:
        with torch.inference_mode():
            model.eval()(input_ids=ids, pixel_values=pixels).logits.float().sum().item()
    print(f"DONE {time.time()}", flush=True)


def write_checkpoint(s: dict, folder: Path) -> Path:
    """The medium (or quick) HF LLaVA of benchmarks/forward.py with the embedded tokenizer."""
    from forward import hf_llava
    from vitsink_jax.embedded import embedded_tokenizer

    hf_llava(s).save_pretrained(folder)
    embedded_tokenizer(s["vocab"]).save_pretrained(str(folder))
    return folder


def run(cmd: list) -> tuple[float, float, str]:
    """(wall-clock start, wall-clock exit, stdout) of ``cmd`` run from the repo root."""
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    return t0, time.time(), proc.stdout


def main(argv=None) -> dict:
    from forward import parse_args
    from vitsink_jax.provenance import machine, package_versions, write_json

    args, s, repeats = parse_args(__doc__, argv, repeats=3)
    repeats = max(repeats, 1)
    s = {**s, "vocab": max(s["vocab"], 512)}  # room for the embedded BPE tokenizer's merges
    work = Path(tempfile.mkdtemp(prefix="startup-"))
    ckpt = write_checkpoint(s, work / "ckpt")
    py = sys.executable
    common = [f"--config.checkpoint={ckpt}"]
    n = [0]

    def ours_train(python=(py,)):
        n[0] += 1
        w = work / f"train{n[0]}"
        t0, _, _ = run([*python, "train.py", "--config", "configs/diysink.py", f"--workdir={w}", *common,
                        f"--config.compile_cache={work / 'xla_train'}",
                        "--config.stage=finetune", "--config.steps=1", f"--config.batch_size={s['batch']}",
                        "--config.diysink.enabled=False", "--config.data.variants=1",
                        f"--config.data.image_size={s['image']}"])
        first = json.loads((w / "metrics.jsonl").read_text().splitlines()[0])  # its "time": step done
        return first["time"] - t0, json.loads((w / "train_summary.json").read_text())["compile"]

    def ours_eval():
        n[0] += 1
        w = work / f"eval{n[0]}"
        t0, end, _ = run([py, "evaluate.py", f"--workdir={w}", *common, "--config.mode=benchmark",
                          f"--config.compile_cache={work / 'xla_eval'}",
                          f"--config.benchmark.limit={s['batch']}", f"--config.eval.batch_size={s['batch']}",
                          f"--config.benchmark.image_size={s['image']}", "--config.benchmark.variants=1",
                          "--config.variants=('none',)"])
        return end - t0, json.loads((w / "results.json").read_text())["compile"]

    def hf(kind):
        t0, _, out = run([py, __file__, f"--hf-{kind}", str(ckpt), str(s["batch"]), str(s["text"])])
        return float(out.split("DONE ")[-1]) - t0

    rows = {"train": {"cold": [], "warm": [], "hf": []}, "eval": {"cold": [], "warm": [], "hf": []}}
    compiles = {}
    for r in range(repeats):
        for kind, ours in (("train", ours_train), ("eval", ours_eval)):
            if r == 0:  # cold: an empty cache of its own (filled by this run)
                seconds, compiles[f"{kind}_cold"] = ours()
                rows[kind]["cold"].append(seconds)
            seconds, compiles[f"{kind}_warm"] = ours()
            rows[kind]["warm"].append(seconds)
            rows[kind]["hf"].append(hf(kind))
    med = {k: {c: float(sorted(v)[len(v) // 2]) for c, v in d.items()} for k, d in rows.items()}
    stats = work / "warm_train.prof"  # one more warm train.py run, under cProfile
    ours_train((py, "-m", "cProfile", "-o", str(stats)))
    result = {"config": s, "repeats": repeats, "seconds": med, "runs": rows, "compile": compiles,
              "profile_warm_train": warm_profile(stats),
              "warm_vs_hf": {k: d["warm"] / d["hf"] for k, d in med.items()},
              "cold_vs_hf": {k: d["cold"] / d["hf"] for k, d in med.items()},
              "versions": package_versions(), "machine": machine(), "device": _device()}
    for kind, label in (("train", "first train step"), ("eval", "first scored batch")):
        d = med[kind]
        print(f"process start -> {label}: ours cold {d['cold']:.1f} s, warm cache {d['warm']:.1f} s, "
              f"HF {d['hf']:.1f} s -> warm {d['warm'] / d['hf']:.2f}x HF "
              f"(compile {compiles[kind + '_cold']['compile_seconds']:.1f} s cold, "
              f"{compiles[kind + '_warm']['compile_seconds']:.1f} s warm)")
    if args.out:
        write_json(args.out, result)
    return result


PROFILED = {  # name -> (file the function is in, function): cumulative seconds in a warm run
    "jax_import": ("jax/__init__.py", "<module>"),
    "torch_import": ("torch/__init__.py", "<module>"),
    "transformers_import": ("transformers/__init__.py", "<module>"),
    "load_checkpoint": ("vitsink_jax/convert/reading.py", "load_pretrained"),
    "abstract_init": ("vitsink_jax/convert/hf.py", "abstract_params"),
    "load_tokenizer": ("vitsink_jax/data/tokenizer.py", "load_tokenizer"),
    "load_data": ("vitsink_jax/train_data.py", "load_data"),
    "first_step": ("vitsink_jax/trainer.py", "run"),  # Runner.run
}


def warm_profile(stats: Path) -> dict:
    """Cumulative seconds of :data:`PROFILED`'s functions in a cProfile of a warm train.py run
    (0 where not called: torch is not imported when nothing needs it); profiler overhead
    included. The step's tracing and compile-cache load are in the run's ``compile`` entry."""
    import pstats

    table = pstats.Stats(str(stats)).stats  # (file, line, function) -> (.., .., .., cumulative, ..)
    return {name: round(sum(v[3] for (f, _, fn), v in table.items()
                            if f.replace("\\", "/").endswith(path) and fn == func), 3)
            for name, (path, func) in PROFILED.items()}


def _device() -> str:
    import jax
    return str(jax.devices()[0])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--hf-train", "--hf-eval"):
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
        hf_child(sys.argv[1][5:], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(0 if main() else 1)
