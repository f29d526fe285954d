"""Checkpoint I/O at a real shape: sharded load onto 8 fake devices and onto two processes,
load throughput against reading the same files, streamed sharded save, transformers parity.

    python benchmarks/io.py --out io.json          # CLIP-L/336 + 1.1B LLaMA, bf16, ~2.8 GB (minutes)
    python benchmarks/io.py --quick --out io.json  # a tiny shape (the test suite)

A synthetic LLaVA checkpoint is written tensor by tensor with the project's safetensors writer
(never through a torch model), in 1 GB shards with an index, as transformers names them. Every
phase runs in a fresh process, so its peak resident memory (``VmHWM`` after ``clear_refs``, see
shared/notes/MEASURING.md) is its own:

* load: ``vj.load_pretrained(dtype=bfloat16, mesh=fsdp 8)`` on 8 fake CPU devices: the peak
  growth of the first load of the model in the process (a tiny checkpoint is loaded before, so
  imports and the runtime's set-up are not counted; the same in the two-process phase); then
  the load alternated with ``cat`` of the same files, page cache warm, and cold where this
  user may drop it (root), medians of the rounds; bytes per
  device against total / 8; then ``vj.save_pretrained(max_shard_size=...)`` of those params.
  Also the per-device bytes of the LLaVA-1.5-7B shape from the same sharding plan (abstract,
  nothing allocated).
* two processes x 4 devices (jax.distributed, gloo), fsdp 8: each process's peak growth.
* parity: transformers loads the saved folder; its logits against ours (fp32) on one prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # vision: CLIP-L/336 (LLaVA-1.5's tower); text: a 1.1B LLaMA (TinyLlama's shape)
    "real": dict(vh=1024, vl=24, vheads=16, vi=4096, image=336, patch=14,
                 th=2048, tl=22, theads=32, tkv=4, ti=5632, vocab=32000),
    "quick": dict(vh=64, vl=2, vheads=4, vi=128, image=56, patch=14,
                  th=128, tl=2, theads=4, tkv=2, ti=256, vocab=512),
}
SHARD = {"real": ("1GB", "500MB"), "quick": ("200KB", "100KB")}  # (checkpoint, save) shard sizes


# ------------------------------------------------------------------------------ measuring ---

def reset_peak() -> int:
    """Resets this process's peak RSS; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak() -> int:
    return _status("VmHWM")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def drop_caches() -> bool:
    """Drops the page cache (root only) so the next read comes from the disk; False if denied."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def device_bytes(params) -> dict:
    """{device id: bytes of the shards it holds} over this process's devices."""
    import jax

    out = {}
    for x in jax.tree_util.tree_leaves(params):
        for s in x.addressable_shards:
            out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
    return out


# ------------------------------------------------------------------------------ checkpoint ---

def llava_config(s: dict):
    from vitsink_jax.config import LlavaConfig, TextConfig, VisionConfig

    vision = VisionConfig(model_type="clip_vision_model", hidden_size=s["vh"], intermediate_size=s["vi"],
                          num_hidden_layers=s["vl"], num_attention_heads=s["vheads"],
                          image_size=s["image"], patch_size=s["patch"])
    text = TextConfig(model_type="llama", vocab_size=s["vocab"], hidden_size=s["th"],
                      intermediate_size=s["ti"], num_hidden_layers=s["tl"],
                      num_attention_heads=s["theads"], num_key_value_heads=s["tkv"],
                      head_dim=s["th"] // s["theads"], max_position_embeddings=4096)
    return LlavaConfig(vision=vision, text=text, image_token_index=s["vocab"] - 1)


def write_checkpoint(shape: str, folder: Path) -> dict:
    """A bf16 LLaVA folder of ``shape`` with random weights (norm scales 1, biases 0), written
    one tensor at a time; returns its sizes."""
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    from vitsink_jax.convert.folders import SAFE_INDEX
    from vitsink_jax.convert.writing import hf_tensors, parse_size, shard_layout
    from vitsink_jax.convert.hf import abstract_params, build_model, hf_shape
    from vitsink_jax.convert.safetensors_io import write_stream
    from flax import traverse_util

    config = llava_config(SHAPES[shape])
    model = build_model(config, dtype=jnp.bfloat16)
    abstract = traverse_util.unflatten_dict(abstract_params(model))
    tensors = hf_tensors(abstract)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    entries = []
    for key, x, _, p in tensors:
        hf = hf_shape(p, x.shape)
        entries.append((key, bf16, hf, int(np.prod(hf)) * 2, p))
    files = shard_layout(entries, parse_size(SHARD[shape][0]))
    rng = np.random.default_rng(0)

    def values(group):
        for key, dt, hf, _, p in group:
            if p[-1] == "scale":  # norms
                yield np.ones(hf, dt)
            elif p[-1] == "bias":
                yield np.zeros(hf, dt)
            else:
                yield (rng.standard_normal(hf, dtype=np.float32) * 0.02).astype(dt)

    folder.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for name, group in zip(names, files):
        write_stream(folder / name, [e[:3] for e in group], values(group), {"format": "pt"})
    index = {"metadata": {"total_size": sum(e[3] for e in entries)},
             "weight_map": {e[0]: n for n, g in zip(names, files) for e in g}}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    hf_cfg = config.to_hf()
    hf_cfg.update(architectures=["LlavaForConditionalGeneration"], dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return {"bytes": index["metadata"]["total_size"], "tensors": len(entries),
            "largest_tensor_bytes": max(e[3] for e in entries), "files": len(files),
            "params": sum(e[3] for e in entries) // 2}


# ------------------------------------------------------------------------------ phases ---

def phase_load(ckpt: Path, out: Path, shape: str, rounds: int) -> dict:
    """8 fake devices: load (alternated with cat), bytes per device, save, the 7B plan."""
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np

    import vitsink_jax as vj
    from vitsink_jax import parallel

    mesh = parallel.make_mesh(jax.device_count())
    vj.load_pretrained(ckpt.with_name("warm"), dtype=jnp.bfloat16, mesh=mesh)  # imports, runtime
    files = sorted(str(f) for f in ckpt.glob("*.safetensors"))
    base = reset_peak()  # the measured load: the first of this model in this process
    model, params = vj.load_pretrained(ckpt, dtype=jnp.bfloat16, mesh=mesh)
    jax.block_until_ready(params)
    growth = peak() - base
    per_device = device_bytes(params)
    del params
    gc.collect()
    times = {"cat_warm": [], "load_warm": [], "cat_cold": [], "load_cold": []}
    cold = shape != "quick" and drop_caches()  # not in the test suite: it empties the whole cache
    for _ in range(rounds):  # alternated, page cache warm; then cold where it can be dropped
        for cache in ("warm", "cold") if cold else ("warm",):
            for what in ("cat", "load"):
                if cache == "cold":
                    drop_caches()
                t0 = time.perf_counter()
                if what == "cat":
                    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
                else:
                    jax.block_until_ready(vj.load_pretrained(ckpt, dtype=jnp.bfloat16, mesh=mesh)[1])
                times[f"{what}_{cache}"].append(time.perf_counter() - t0)
                gc.collect()
    model, params = vj.load_pretrained(ckpt, dtype=jnp.bfloat16, mesh=mesh)
    gc.collect()
    base = reset_peak()
    t0 = time.perf_counter()
    vj.save_pretrained(model, params, out, max_shard_size=SHARD[shape][1])
    save_s = time.perf_counter() - t0
    save_growth = peak() - base
    return {"devices": jax.device_count(), "load_peak_growth_bytes": growth,
            **{f"{k}_s": float(np.median(v)) if v else None for k, v in times.items()},
            "per_device_bytes": per_device, "save_s": save_s, "save_peak_growth_bytes": save_growth,
            "save_files": len(list(out.glob("*.safetensors"))),
            "llava_1_5_7b_plan": plan_bytes_7b(mesh)}


def plan_bytes_7b(mesh) -> dict:
    """Per-device bf16 bytes of the LLaVA-1.5-7B shape under the loader's sharding plan."""
    import jax
    import numpy as np
    from flax import traverse_util

    from vitsink_jax import parallel
    from vitsink_jax.convert.hf import abstract_params, build_model

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory import SHAPES as BIG, llava_config as big_config

    abstract = traverse_util.unflatten_dict(abstract_params(build_model(big_config(BIG["llava-1.5-7b"], False))))
    shardings = parallel.param_shardings(abstract, mesh)
    total = sum(int(np.prod(x.shape)) * 2 for x in jax.tree_util.tree_leaves(abstract))
    per = {}
    for x, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)):
        for d, index in s.devices_indices_map(x.shape).items():
            n = int(np.prod([len(range(*sl.indices(dim))) for sl, dim in zip(index, x.shape)]))
            per[d.id] = per.get(d.id, 0) + 2 * n
    return {"total_bytes": total, "max_device_bytes": max(per.values()),
            "min_device_bytes": min(per.values()), "vs_total_over_n": max(per.values()) / (total / len(per))}


def phase_multi(ckpt: Path, port: int, pid: int) -> dict:
    import gc

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jax.numpy as jnp

    import vitsink_jax as vj
    from vitsink_jax import parallel

    mesh = parallel.make_mesh(jax.device_count())
    vj.load_pretrained(ckpt.with_name("warm"), dtype=jnp.bfloat16, mesh=mesh)  # imports, runtime
    gc.collect()
    base = reset_peak()
    t0 = time.perf_counter()
    _, params = vj.load_pretrained(ckpt, dtype=jnp.bfloat16, mesh=mesh)
    jax.block_until_ready(params)
    return {"process": pid, "load_s": time.perf_counter() - t0, "peak_growth_bytes": peak() - base,
            "held_bytes": sum(device_bytes(params).values())}


def phase_parity(saved: Path) -> dict:
    """transformers' logits on the saved folder against ours (fp32, one prompt with an image)."""
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    import vitsink_jax as vj

    model, params = vj.load_pretrained(saved, dtype=jnp.float32)
    c = model.config
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1, 5, 7], np.full(c.num_image_tokens, c.image_token_index),
                          rng.integers(3, c.image_token_index, 8)])[None].astype(np.int32)
    pixels = rng.standard_normal((1, 3, c.input_size, c.input_size)).astype(np.float32)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels)).logits)
    del params
    torch.set_num_threads(os.cpu_count() or 1)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(saved), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels)).logits.numpy()
    err = float(np.max(np.abs(ours - ref)))
    return {"max_abs_diff": err, "logit_scale": float(np.max(np.abs(ref))),
            "relative": err / max(1.0, float(np.max(np.abs(ref))))}


# ------------------------------------------------------------------------------ driver ---

def _run(args: list, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, text=True,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _result(proc) -> dict:
    out, err = proc.communicate(timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"phase failed:\n{err[-4000:]}")
    return json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, help="where the checkpoint is written (default: a temp dir)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--phase", choices=["load", "multi", "parity"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = "quick" if args.quick else "real"
    if args.phase:  # one measured phase, in a fresh process
        result = {"load": lambda: phase_load(args.ckpt, args.out, shape, args.rounds),
                  "multi": lambda: phase_multi(args.ckpt, args.port, args.pid),
                  "parity": lambda: phase_parity(args.ckpt)}[args.phase]()
        print("RESULT " + json.dumps(result), flush=True)
        return result

    from vitsink_jax.convert.writing import parse_size
    from vitsink_jax.provenance import machine, package_versions, write_json

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        ckpt, saved = tmp / "ckpt", tmp / "saved"
        t0 = time.perf_counter()
        sizes = write_checkpoint(shape, ckpt)
        write_checkpoint("quick", tmp / "warm")  # loaded first by each phase: imports, runtime
        print(f"checkpoint: {sizes['params'] / 1e9:.2f}B params, {sizes['bytes'] / 2**30:.2f} GiB bf16 in "
              f"{sizes['files']} files, largest tensor {sizes['largest_tensor_bytes'] / 2**20:.0f} MiB "
              f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)
        common = ["--rounds", str(args.rounds)] + (["--quick"] if args.quick else [])
        load = _result(_run(["--phase", "load", "--ckpt", str(ckpt), "--out", str(saved), *common],
                            {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        multi = [_result(p) for p in [_run(["--phase", "multi", "--ckpt", str(ckpt), "--port", str(port),
                                            "--pid", str(i), *common], env) for i in range(2)]]
        parity = _result(_run(["--phase", "parity", "--ckpt", str(saved), *common], {"JAX_PLATFORMS": "cpu"}))
    total, largest = sizes["bytes"], sizes["largest_tensor_bytes"]
    per = list(load["per_device_bytes"].values())
    result = {
        "shape": SHAPES[shape], "checkpoint": sizes, "load": load, "two_processes": multi, "parity": parity,
        "figures": {
            "max_device_bytes_vs_total_over_8": max(per) / (total / 8),
            "load_peak_vs_model_plus_largest": load["load_peak_growth_bytes"] / (total + largest),
            "two_process_peak_vs_half_plus_largest": max(m["peak_growth_bytes"] for m in multi) / (total / 2 + largest),
            "load_throughput_vs_cat_warm": load["cat_warm_s"] / load["load_warm_s"],
            "load_throughput_vs_cat_cold": load["cat_cold_s"] / load["load_cold_s"] if load["cat_cold_s"] else None,
            "save_peak_vs_shard_plus_largest": load["save_peak_growth_bytes"] / (
                parse_size(SHARD[shape][1]) + largest),
            "parity_relative": parity["relative"],
        },
        "versions": package_versions(), "machine": machine(),
    }
    f = result["figures"]
    print(f"fsdp=8 load: largest device holds {f['max_device_bytes_vs_total_over_8']:.3f}x total/8; "
          f"peak RSS growth {load['load_peak_growth_bytes'] / 2**30:.2f} GiB = "
          f"{f['load_peak_vs_model_plus_largest']:.2f}x (model + largest tensor) [target <= 1.1]\n"
          f"two processes x 4 devices: peak growth per process "
          f"{[round(m['peak_growth_bytes'] / 2**30, 2) for m in multi]} GiB = "
          f"{f['two_process_peak_vs_half_plus_largest']:.2f}x (half + largest) [target <= 1.1]\n"
          f"load vs cat, page cache warm: {load['load_warm_s']:.2f} s vs {load['cat_warm_s']:.2f} s = "
          f"{f['load_throughput_vs_cat_warm']:.2f}x of the raw read; cold: "
          + (f"{load['load_cold_s']:.2f} s vs {load['cat_cold_s']:.2f} s = {f['load_throughput_vs_cat_cold']:.2f}x"
             if load["cat_cold_s"] else "not measured (quick run, or the page cache cannot be dropped here)") + " [target >= 0.5]\n"
          f"sharded save ({load['save_files']} files): peak growth {load['save_peak_growth_bytes'] / 2**20:.0f} MiB = "
          f"{f['save_peak_vs_shard_plus_largest']:.2f}x (max_shard_size + largest) [target <= 1.1]; "
          f"transformers on the saved folder: max|logit diff| {parity['max_abs_diff']:.2e} "
          f"(scale {parity['logit_scale']:.2f})\n"
          f"LLaVA-1.5-7B plan, bf16, fsdp=8: {load['llava_1_5_7b_plan']['max_device_bytes'] / 2**30:.3f} GiB "
          f"on the fullest device = {load['llava_1_5_7b_plan']['vs_total_over_n']:.3f}x total/8", flush=True)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
