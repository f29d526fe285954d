"""The instruction-data build at the sizes the paper's recipes train on: its rate (rows / s, per
worker process) and the peak memory of the whole build (the building process and its workers)
as the rows grow, on synthetic LLaVA-style conversations over a few hundred 640 x 480 JPEGs
(crops of scikit-image's photos; one row in ten text-only).

Each build runs in a fresh process (``vitsink_jax.data.instruct_build.build_json``: the JSON
read item by item, shards checked, tokenized and written by worker processes), while a thread
sums the resident memory of that process and its workers every 20 ms. Targets (issue 32): the
peak at 20k rows at most 1.2x the peak at 2k rows (memory flat in the rows), and two workers at
least 1.6x the rate of one on a host with two cores or more.

    python benchmarks/data_build.py            # 2k and 20k rows; writes "data_build" in results.json
    python benchmarks/data_build.py --quick    # 200 and 400 rows (the test suite)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_images(folder: Path, count: int, size=(640, 480)) -> list:
    """``count`` JPEGs of ``size`` cut from scikit-image's photos (shifted, flipped, scaled), as
    LLaVA's images are photos of about this size; returns their file names."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    rng, names = np.random.default_rng(0), []
    for i in range(count):
        photo = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        scale = max(size[0] / photo.width, size[1] / photo.height) * rng.uniform(1.0, 1.6)
        photo = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1))
        x, y = rng.integers(0, photo.width - size[0] + 1), rng.integers(0, photo.height - size[1] + 1)
        crop = photo.crop((x, y, x + size[0], y + size[1]))
        if i % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        names.append(f"{i:04d}.jpg")
        (folder / names[-1]).write_bytes(buf.getvalue())
    return names


def write_rows(path: Path, rows: int, images: list) -> None:
    """A LLaVA-format JSON of ``rows`` conversations (1-3 rounds of ~20-60 words, the image
    placeholder first or last as in LLaVA-Instruct, every tenth row text-only), written item by
    item."""
    import numpy as np

    rng = np.random.default_rng(1)
    words = "the a photo shows man woman dog cat table red blue left right near far many two".split()
    say = lambda k: " ".join(rng.choice(words, k)) + "."  # noqa: E731
    with open(path, "w") as f:
        f.write("[")
        for n in range(rows):
            conv = []
            for r in range(int(rng.integers(1, 4))):
                conv += [{"from": "human", "value": say(int(rng.integers(8, 20))) + "?"},
                         {"from": "gpt", "value": say(int(rng.integers(20, 60)))}]
            item = {"id": f"{n:06d}", "conversations": conv}
            if n % 10:
                item["image"] = images[n % len(images)]
                first = conv[0]["value"]
                conv[0]["value"] = f"<image>\n{first}" if n % 2 else f"{first}\n<image>"
            f.write(("," if n else "") + json.dumps(item))
        f.write("]")


CHILD = """
import json, os, sys, threading, time
from pathlib import Path
from vitsink_jax.data import instruct_build as B
from vitsink_jax.data.prompts import prompt_format
from vitsink_jax.embedded import embedded_config, embedded_shape, embedded_tokenizer

def tree_rss():
    pids, total = [os.getpid()], 0
    while pids:
        pid = pids.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    pids += [int(p) for p in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total

peak, stop = [tree_rss()], threading.Event()
def watch():
    while not stop.wait(0.02):
        peak[0] = max(peak[0], tree_rss())
threading.Thread(target=watch, daemon=True).start()
path, out, workers, shard_rows = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
e = embedded_shape()
config, tok = embedded_config(e), embedded_tokenizer(e.vocab_size)
spec = B.TokenSpec(tok, prompt_format(config, tok))
start = time.perf_counter()
manifest = B.build_json(path, None, out, {"json": path}, spec, workers, shard_rows, verbose=False)
seconds = time.perf_counter() - start
stop.set()
peak[0] = max(peak[0], tree_rss())
print(json.dumps({"seconds": seconds, "rows": manifest["rows"], "skipped": manifest["skipped_count"],
                  "peak_rss_bytes": peak[0]}))
"""


def run_build(json_path: Path, out: Path, workers: int, shard_rows: int) -> dict:
    """One build in a fresh process: seconds, rows kept, peak resident bytes of its tree."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(json_path), str(out), str(workers),
                           str(shard_rows)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "VITSINK_JAX_PROGRESS": "off"})
    if proc.returncode:
        raise RuntimeError(f"the build of {json_path} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    from vitsink_jax.provenance import machine, merge_json, package_versions, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    sizes, images, shard_rows = ((100, 200), 10, 50) if args.quick else ((2000, 20000), 300, 500)
    work = Path(tempfile.mkdtemp(prefix="data-build-"))
    try:
        names = make_images(work / "images", images)
        runs = []
        for rows in sizes:
            path = work / f"rows{rows}.json"
            write_rows(path, rows, [f"images/{n}" for n in names])
            for workers in (1, 2):
                r = run_build(path, work / "out", workers, shard_rows)
                runs.append({"source_rows": rows, "workers": workers, **r,
                             "rows_per_s": r["rows"] / r["seconds"]})
                print(f"{rows} rows, {workers} worker(s): {r['seconds']:.1f} s = "
                      f"{runs[-1]['rows_per_s']:.0f} rows/s, peak {r['peak_rss_bytes'] / 2 ** 20:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {(r["source_rows"], r["workers"]): r for r in runs}
    small, large = sizes
    rss_ratio = max(by[large, w]["peak_rss_bytes"] / by[small, w]["peak_rss_bytes"] for w in (1, 2))
    scaling = by[large, 2]["rows_per_s"] / by[large, 1]["rows_per_s"]
    cores = len(os.sched_getaffinity(0))
    result = {"image_size": [640, 480], "images": images, "shard_rows": shard_rows, "runs": runs,
              "peak_rss_ratio": rss_ratio, "rate_two_workers_vs_one": scaling, "host_cores": cores,
              "targets": {"peak_rss_ratio": 1.2, "rate_two_workers_vs_one": 1.6},
              "tokenizer": "the embedded model's (vocabulary 512)",
              "versions": package_versions(), "machine": machine()}
    print(f"peak memory {large} vs {small} rows: {rss_ratio:.2f}x (target <= 1.2x); two workers "
          f"vs one at {large} rows: {scaling:.2f}x (target >= 1.6x, {cores} cores)")
    if args.out:
        write_json(args.out, result)
    if not args.quick:
        merge_json(ROOT / "benchmarks" / "results.json", "data_build", result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
