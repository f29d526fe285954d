"""One prepared accelerator run: the speed benchmarks in turn, each in its own process under its
own time budget, on whatever device JAX sees, their results gathered into one JSON with the
device kind. The budgets add up to 9 minutes, so the whole run fits a 10-minute device lease.

Our side runs on the accelerator; the Hugging Face contenders run where this environment's
torch runs (the pinned CPU wheel: on a GPU host their ratios compare different hardware and
are recorded, not read as speed-ups). A script that overruns its budget is stopped and
recorded as such; the others still run.

    python benchmarks/accelerator.py --out accelerator.json           # the prepared run
    python benchmarks/accelerator.py --quick --only forward --out x   # tiny shapes (tests)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (script, its arguments for the accelerator run, budget in seconds): MFU first (the figure no
# CPU can give), then the issue-18 speed scripts with fewer repeats than on the CPU
PLAN = (("mfu", ["--repeats", "3"], 180),
        ("forward", ["--repeats", "3"], 45),
        ("generate", ["--repeats", "3"], 60),
        ("eval_throughput", ["--repeats", "1", "--items", "24"], 90),
        ("train_step", ["--repeats", "3", "--only-fp32"], 90),
        ("pruning", ["--repeats", "3"], 75))


def run_script(name: str, args: list, budget: float, folder: Path) -> dict:
    """One script in its own process: {"seconds", "status" ("ok" / "failed" / "timed_out"),
    "result" (its --out JSON when ok), "error" (the tail of its output otherwise)}."""
    out = folder / f"{name}.json"
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args,
                               f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"seconds": time.time() - t0, "status": "timed_out", "budget_s": budget}
    entry = {"seconds": time.time() - t0, "budget_s": budget}
    if proc.returncode or not out.is_file():
        return {**entry, "status": "failed", "error": (proc.stdout + proc.stderr)[-2000:]}
    return {**entry, "status": "ok", "result": json.loads(out.read_text())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (each script's --quick)")
    ap.add_argument("--only", nargs="*", help="run these scripts only")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import jax

    from vitsink_jax.provenance import machine, package_versions, write_json

    plan = [p for p in PLAN if not args.only or p[0] in args.only]
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        for name, script_args, budget in plan:
            runs[name] = run_script(name, ["--quick"] if args.quick else script_args, budget, Path(d))
            print(f"{name}: {runs[name]['status']} in {runs[name]['seconds']:.0f} s "
                  f"(budget {budget} s)", flush=True)
    result = {"device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
              "budget_s": sum(b for _, _, b in plan), "runs": runs,
              "versions": package_versions(), "machine": machine()}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if all(r["status"] == "ok" for r in main()["runs"].values()) else 1)
