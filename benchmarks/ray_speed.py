"""`attribute --ray`: images/s with one and two local Ray workers, and the merge checked exact.

    python benchmarks/ray_speed.py --images 320 [--model deeplab_digits] [--batch 8]

Copies the first --images scenes of samples/data/digit_scenes/unlabeled (made on demand) to
a temporary folder and runs, end to end (cluster connection, worker start and model loading
included, the cluster's own start excluded):
  process   onnxcut.attribute in this process, one onnxruntime thread
  ray x1    attribute_ray on a local one-node cluster with one CPU: one worker, one shard
  ray x2    the same with two CPUs: two workers, two shards
and prints images/s, ray x2 / ray x1 (target >= 1.8 on 160+ images) and whether both Ray
runs' merged scores equal the single process's bit for bit (exit 1 if not). Each task runs
one onnxruntime thread, so two workers need two free cores to scale.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ray.cluster_utils import Cluster

from onnxcut.attribution.cluster import attribute_ray
from onnxcut.attribution.driver import AttributeOptions, attribute

ROOT = Path(__file__).resolve().parents[1]
UNLABELED = ROOT / "samples" / "data" / "digit_scenes" / "unlabeled"


def _images(n: int, folder: Path) -> Path:
    if len(list(UNLABELED.glob("*.png"))) < n:
        script = ROOT / "samples" / "make_data.py"
        subprocess.run([sys.executable, str(script), "--splits", "unlabeled"], check=True)
    for path in sorted(UNLABELED.glob("*.png"))[:n]:
        shutil.copy(path, folder / path.name)
    return folder


def _same(a, b) -> bool:
    return np.array_equal(a.count, b.count) and all(
        np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays
    )


def _ray(model: Path, images: Path, opts: AttributeOptions, workers: int):
    # One node: every extra node brings its own raylet and agents, which compete for the cores.
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": workers, "include_dashboard": False}
    )
    try:
        cluster.wait_for_nodes()
        start = time.perf_counter()
        scores = attribute_ray(model, images, opts, address=cluster.address, shards=workers)
        return scores, time.perf_counter() - start
    finally:
        cluster.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--model", default="deeplab_digits")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    model = ROOT / "samples" / "models" / f"{args.model}.onnx"
    opts = AttributeOptions(batch=args.batch, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        images = _images(args.images, Path(tmp))
        print(f"{args.model}, {args.images} images, batch {args.batch}, 1 thread per task")
        start = time.perf_counter()
        single = attribute(model, images, opts)
        rows = [("process", single, time.perf_counter() - start)]
        for workers in (1, 2):
            rows.append((f"ray x{workers}", *_ray(model, images, opts, workers)))
    exact = True
    for name, scores, seconds in rows:
        same = _same(scores, single)
        exact &= same
        print(f"{name:8s} {args.images / seconds:7.1f} img/s  {seconds:6.1f} s  exact {same}")
    ratio = rows[1][2] / rows[2][2]
    print(f"ray x2 / ray x1: {ratio:.2f}x (target >= 1.8)")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
