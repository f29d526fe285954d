"""Training step speed: one full fine-tuning step (every param trains: vision tower, projector,
LLM; AdamW, gradient clipping) of vitsink_jax exactly as train.py runs it (``trainer.load_model``,
``trainer.Runner`` on a one-device mesh: donated state, the numpy batch placed by the runner,
the metrics read back as the training loop reads them) vs Hugging Face PyTorch
(``LlavaForConditionalGeneration``, SDPA attention, ``torch.optim.AdamW(fused=True)``, and
eager attention for reference), same weights and batch, the steps taking turns. Beside it our
step in bf16 compute and with remat. Per contender: the median wall time of a step and, from
``getrusage``, its minor page faults, system and user CPU seconds. The roofline: our step's FLOPs
(XLA's count) per second, ours and HF's, as a share of a large matmul's FLOP/s measured here;
and from a JAX profiler trace of our step, the milliseconds per step of each kind of operation.

The profile of our step (same process): the jitted step alone on a batch already on the
device, with the batch from numpy, without state donation, and with the metrics pulled every
step; and, from a child process started with glibc's default malloc (``--malloc=default``), the
same step without ``train_lib.keep_host_memory`` (the figures before that fix). ``--quick``
compiles our fp32 step alone (no bf16, remat, undonated step or child process).

    python benchmarks/train_step.py            # medium config; writes "train_step" in results.json
    python benchmarks/train_step.py --quick    # tiny config, one repeat (the test suite)
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitsink_jax import parallel, train_lib  # noqa: E402

if "--malloc=default" not in sys.argv:  # before JAX or torch start a thread, as train.py does
    train_lib.keep_host_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from forward import compiled_flops, hf_llava, matmul_peak, parse_args  # noqa: E402
from vitsink_jax import trainer  # noqa: E402
from vitsink_jax.provenance import machine, merge_json, package_versions, write_json  # noqa: E402

PARTS = ("multi_modal_projector", "language_model", "vision_tower")  # a plain LLaVA: everything
LR = 2e-5


def usage() -> np.ndarray:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return np.array([time.perf_counter(), r.ru_minflt, r.ru_stime, r.ru_utime])


def per_step(fns: dict, repeats: int) -> dict:
    """{name: {wall_s, minor_faults, sys_s, user_s}}: medians over ``repeats`` rounds of one
    call of each ``fn`` (which returns once its step is done), the calls taking turns; one
    warm-up call each first (compile)."""
    for fn in fns.values():
        fn()
    rows = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before = usage()
            fn()
            rows[name].append(usage() - before)
    keys = ("wall_s", "minor_faults", "sys_s", "user_s")
    return {name: dict(zip(keys, map(float, np.median(np.array(r), axis=0))))
            for name, r in rows.items()}


def train_config(s: dict, ckpt: str, **kw):
    """configs/diysink.py for a full fine-tuning run of the plain LLaVA in ``ckpt``."""
    spec = importlib.util.spec_from_file_location("diysink_config", ROOT / "configs" / "diysink.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.update(dict(checkpoint=ckpt, stage="finetune", finetune_parts=PARTS, steps=1000,
                    batch_size=s["batch"], **kw))
    cfg.diysink.enabled = False
    cfg.optim.lr = LR
    return cfg


@contextmanager
def no_tokenizer():
    """trainer.load_model wants the checkpoint's tokenizer files; the benchmark feeds token ids."""
    plain = trainer.load_tokenizer
    trainer.load_tokenizer = lambda path: object()
    try:
        yield
    finally:
        trainer.load_tokenizer = plain


def ours(s: dict, ckpt: str, mesh, **kw):
    """(runner, state) of train.py for the config with ``kw``."""
    cfg = train_config(s, ckpt, **kw)
    with no_tokenizer():
        model, params, _ = trainer.load_model(cfg, Path(ckpt), mesh)
    trainable, frozen = train_lib.split_params(params, train_lib.trainable_parts("finetune", PARTS))
    tx, schedules = train_lib.make_optimizer(cfg.optim, cfg.steps, cfg.stage, tuple(trainable))
    state = {"step": jnp.asarray(0, jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable)}
    runner = trainer.Runner(cfg, model, tx, schedules, frozen, mesh)
    return runner, runner.place(state)


def batch_of(s: dict, n_img: int) -> dict:
    """One training batch: an image block at position 4, answer tokens the last half of the text."""
    rng = np.random.default_rng(0)
    t = s["text"] + n_img
    ids = rng.integers(3, s["vocab"] - 2, size=(s["batch"], t)).astype(np.int32)
    ids[:, 4:4 + n_img] = s["vocab"] - 1
    loss_mask = np.zeros_like(ids, bool)
    loss_mask[:, -s["text"] // 2:] = True
    return {"ids": ids, "mask": np.ones_like(ids), "loss_mask": loss_mask,
            "question_mask": ~loss_mask & (ids != s["vocab"] - 1),
            "pixels": rng.standard_normal((s["batch"], 3, s["image"], s["image"])).astype(np.float32)}


class OurStep:
    """One training-loop step of train.py (the state carried from call to call): ``run``
    places the numpy batch, runs the step and reads the metrics back as the loop does;
    ``losses`` holds every step's loss."""

    def __init__(self, runner, state, batch):
        self.runner, self.state, self.batch, self.losses = runner, state, batch, []

    def __call__(self):
        self.state, metrics = self.runner.run(self.state, self.batch)
        self.losses.append(self.runner.host_metrics(metrics)["loss"])

    def device_only(self, batch, pull: bool, step=None):
        """The jitted step on ``batch`` (already on the device); blocks on its state, reads the
        metrics only when ``pull``."""
        def call():
            self.state, metrics = (step or self.runner.step)(self.state, self.runner.frozen, batch)
            jax.block_until_ready(self.state)
            if pull:
                self.runner.host_metrics(metrics)
        return call


def hf_step(hf, batch: dict):
    """One HF training step: forward with labels, backward, clip to 1.0, fused AdamW, zero."""
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.0, fused=True)
    ids = torch.tensor(batch["ids"], dtype=torch.long)
    kw = dict(input_ids=ids, pixel_values=torch.tensor(batch["pixels"]),
              attention_mask=torch.tensor(batch["mask"], dtype=torch.long),
              labels=torch.where(torch.tensor(batch["loss_mask"]), ids, -100))
    losses = []

    def step():
        loss = hf(**kw).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return step, losses


def profile_ours(fp32: OurStep, mesh, repeats: int, donation: bool) -> dict:
    """Our fp32 step taken apart (see the module doc); ``donation``: also the step without
    donating its state (one more compile)."""
    on_device = parallel.global_batch(fp32.batch, mesh)
    fns = {"device_batch": fp32.device_only(on_device, pull=False),
           "device_batch_pull_metrics": fp32.device_only(on_device, pull=True),
           "numpy_batch_train_loop": fp32}
    if donation:
        undonated = jax.jit(fp32.runner._step)  # the runner's step without donating the state
        fns["no_donation"] = fp32.device_only(on_device, pull=False, step=undonated)
    return per_step(fns, repeats)


@contextmanager
def loss_bucket_of(batch: dict):
    """The training loss traced with the one bucket of answer positions ``batch`` runs
    (``train_lib.loss_buckets`` patched): XLA's cost analysis of the step's ``lax.switch`` over
    every bucket counts its largest branch, not the one the step takes."""
    count = int(np.max(batch["loss_mask"][:, 1:].sum(axis=1)))
    plain = train_lib.loss_buckets
    train_lib.loss_buckets = lambda n, *a: (next(m for m in plain(n, *a) if m >= count),)
    try:
        yield
    finally:
        train_lib.loss_buckets = plain


def roofline(fp32: OurStep, s: dict, mesh, t: dict, n: int, repeats: int) -> dict:
    """Our fp32 step's FLOPs (XLA's count of the compiled step, its loss traced with the bucket
    of answer positions this batch runs: :func:`loss_bucket_of`) against an n x n matmul's
    FLOP/s measured here: the share of that peak our step and HF's (SDPA) run at. HF's step
    runs its LM head (forward and both backward matmuls) over every position, ours over the
    bucket: HF's FLOPs are ours plus those of the other positions' head."""
    with loss_bucket_of(fp32.batch):
        flops = compiled_flops(jax.jit(fp32.runner._step), fp32.state, fp32.runner.frozen,
                               parallel.global_batch(fp32.batch, mesh))
        rows, positions = fp32.batch["ids"].shape
        bucket = train_lib.loss_buckets(positions - 1)[0]
    hf_flops = flops + 6 * rows * (positions - bucket) * s["th"] * s["vocab"]
    peak = matmul_peak(n, repeats)
    return {"step_flops": flops, "hf_step_flops": hf_flops, "loss_positions": bucket,
            "matmul_peak_flops_per_s": peak,
            "ours_fp32_fraction_of_peak": flops / t["ours_fp32"]["wall_s"] / peak,
            "hf_sdpa_fraction_of_peak": hf_flops / t["hf_sdpa"]["wall_s"] / peak}


OP_KINDS = (("matmul fusions (YNNPACK)", r"^ynn_fusion"), ("Eigen dots", r"^dot(\.|$)"),
            ("transposes and copies", r"transpose|copy"),
            ("elementwise and reductions", r"fusion|^wrapped_|reduce|select|convert"))


def op_breakdown(fp32: OurStep, mesh, steps: int = 3) -> dict:
    """Milliseconds per step of each kind of XLA:CPU operation (:data:`OP_KINDS`, by op name),
    summed over the threads that run them, from a JAX profiler trace of ``steps`` device steps."""
    import gzip
    import re

    call = fp32.device_only(parallel.global_batch(fp32.batch, mesh), pull=False)
    call()
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(steps):
            call()
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(next(Path(d).rglob("*.trace.json.gz"))))
    out = {kind: 0.0 for kind, _ in OP_KINDS}
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("$", "end:", "ThunkExecutor")):
            continue
        kind = next((k for k, pattern in OP_KINDS if re.search(pattern, name)), None)
        if kind:
            out[kind] += e.get("dur", 0) / 1e3 / steps
    return out


def default_malloc_run(argv) -> dict:
    """This benchmark's fp32 and HF SDPA figures in a child process with glibc's default malloc."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "default.json"
        subprocess.run([sys.executable, __file__, "--malloc=default", "--only-fp32", f"--out={out}"]
                       + [a for a in argv if a == "--quick" or a.startswith("--repeats")],
                       check=True, cwd=ROOT)
        return json.loads(out.read_text())


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, s, repeats = parse_args(__doc__, argv, malloc=dict(choices=("kept", "default"), default="kept"),
                                  **{"only-fp32": dict(action="store_true")})
    hf = hf_llava(s).train()
    mesh = parallel.make_mesh(1)
    with tempfile.TemporaryDirectory() as ckpt:
        hf.save_pretrained(ckpt)
        variants = {"fp32": {}} if args.only_fp32 or args.quick else {  # quick: one compile
            "fp32": {}, "bf16": dict(compute_dtype="bfloat16"), "remat": dict(remat=True)}
        steps = {}
        for name, kw in variants.items():
            runner, state = ours(s, ckpt, mesh, **kw)
            steps[name] = OurStep(runner, state, batch_of(s, (s["image"] // s["patch"]) ** 2))
    batch = steps["fp32"].batch
    sdpa = copy.deepcopy(hf)
    sdpa.set_attn_implementation("sdpa")
    contenders = {f"ours_{k}": v for k, v in steps.items()}
    hf_losses = {}
    for name, model in {"hf_sdpa": sdpa, "hf_eager": hf}.items():
        if name == "hf_sdpa" or not args.only_fp32:
            contenders[name], hf_losses[name] = hf_step(model, batch)
    t = per_step(contenders, repeats)
    profile = profile_ours(steps["fp32"], mesh, repeats, donation=not args.quick)
    result = {"config": s, "tokens": int(batch["ids"].shape[1]), "repeats": repeats,
              "malloc": args.malloc, "torch_threads": torch.get_num_threads(),
              "host_cores": len(os.sched_getaffinity(0)),
              "trainable_params": int(sum(x.size for x in jax.tree_util.tree_leaves(
                  steps["fp32"].state["trainable"]))),
              "step": t, "profile_fp32": profile,
              "first_loss": {**{f"ours_{k}": v.losses[0] for k, v in steps.items()},
                             **{k: v[0] for k, v in hf_losses.items()}},
              "versions": package_versions(), "machine": machine(), "device": str(jax.devices()[0])}
    for name in t:
        result["step"][name]["sys_share"] = t[name]["sys_s"] / t[name]["wall_s"]
    result["roofline"] = roofline(steps["fp32"], s, mesh, t, 256 if args.quick else 2048, repeats)
    result["op_ms_per_step"] = op_breakdown(steps["fp32"], mesh)
    for ref in ("hf_sdpa", "hf_eager"):
        if ref in t:
            result[f"speedup_vs_{ref}"] = t[ref]["wall_s"] / t["ours_fp32"]["wall_s"]
    if args.malloc == "kept" and not args.quick:
        result["default_malloc"] = default_malloc_run(argv)
    report(result)
    if args.out:
        write_json(args.out, result)
    if not args.quick and args.malloc == "kept":
        merge_json(ROOT / "benchmarks" / "results.json", "train_step", result)
    return result


def report(r: dict) -> None:
    print(f"full fine-tuning step, {r['trainable_params'] / 1e6:.1f}M params, batch "
          f"{r['config']['batch']} x {r['tokens']} tokens, malloc {r['malloc']}:")
    for name, x in {**r["step"], **{f"profile {k}": v for k, v in r["profile_fp32"].items()}}.items():
        print(f"  {name:36s} {x['wall_s'] * 1e3:8.1f} ms  {x['minor_faults']:8.0f} faults  "
              f"sys {x['sys_s'] * 1e3:6.1f} ms  user {x['user_s'] * 1e3:7.1f} ms")
    print("  " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs")))
    roof = r["roofline"]
    print(f"  {roof['step_flops'] / 1e9:.1f} GFLOP per step (XLA's count; HF's "
          f"{roof.get('hf_step_flops', roof['step_flops']) / 1e9:.1f}): ours at "
          f"{100 * roof['ours_fp32_fraction_of_peak']:.0f}%, HF SDPA at {100 * roof['hf_sdpa_fraction_of_peak']:.0f}% "
          f"of the {roof['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s matmul peak measured here")
    print("  op time per step (summed over threads): " + ", ".join(
        f"{k} {v:.0f} ms" for k, v in r["op_ms_per_step"].items()))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
