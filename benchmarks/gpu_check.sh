#!/usr/bin/env bash
# Every GPU check of onnxcut, in one script that runs unchanged on a machine with an NVIDIA GPU:
#
#   bash benchmarks/gpu_check.sh [IMAGES]        (IMAGES: scenes to attribute, default 160)
#
# 1. install: a venv (seeing the machine's packages) with onnxcut[gpu,dev]; where pip cannot
#    reach an index, the machine's own onnxruntime is used if it has the CUDA provider;
# 2. tests/test_gpu.py: attribute, extract, distill and eval on CUDA, an extracted model on
#    TensorRT (each compared with the CPU);
# 3. figures: `attribute` images/s on the ResNet-18-size sample (deeplab_wide_digits, built
#    with torch when missing) with 2 CPU threads pinned to 2 cores and with CUDA (target:
#    CUDA >= 10x); extract digits 3,5 at half the FLOPs (refit with --reconstruct), distill
#    one epoch on CUDA, eval on CUDA; TensorRT engine build of the sub-network with its
#    latency beside the FLOPs ratio (onnxruntime's TensorRT provider, and trtexec when it is
#    on PATH).
# Figures are printed; nothing is written outside /tmp/onnxcut-gpu and .venv-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${1:-160}
WORK=/tmp/onnxcut-gpu
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# 1. install
python3 -m venv --system-site-packages .venv-gpu
PY=.venv-gpu/bin/python
if ! .venv-gpu/bin/pip install -q -e '.[gpu,dev,digits]' 2>"$WORK/pip.log"; then
  echo "pip could not install onnxcut[gpu] (see $WORK/pip.log); using the machine's packages"
  .venv-gpu/bin/pip install -q --no-deps --no-build-isolation -e . 2>>"$WORK/pip.log" || true
fi
$PY - <<'EOF'
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers())
assert "CUDAExecutionProvider" in ort.get_available_providers(), "no CUDA provider: stop"
EOF

# 2. tests
$PY -m pytest -q -rs tests/test_gpu.py

# 3. figures
$PY samples/make_data.py --splits unlabeled >/dev/null
$PY - "$IMAGES" "$WORK" <<'EOF'
import json, os, shutil, subprocess, sys, time
from pathlib import Path

images, work = int(sys.argv[1]), Path(sys.argv[2])
root = Path.cwd()
onnxcut = [str(root / ".venv-gpu/bin/onnxcut")]
try:
    sys.path.insert(0, str(root))
    from samples.train import ensure_model  # torch: trains the wide sample when missing

    wide = ensure_model("deeplab_wide_digits")
except ImportError as e:
    wide = root / "samples/models/deeplab_wide_digits.onnx"
    if not wide.exists():
        sys.exit(f"deeplab_wide_digits.onnx missing and cannot be built here ({e})")
folder = work / "images"
shutil.rmtree(folder, ignore_errors=True)
folder.mkdir()
for p in sorted((root / "samples/data/digit_scenes/unlabeled").glob("*.png"))[:images]:
    shutil.copy(p, folder / p.name)


def run(args, pin=None):
    cmd = (["taskset", "-c", pin] if pin else []) + onnxcut + [str(a) for a in args]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return out, time.perf_counter() - start


speed = {}
for name, extra, pin in (
    ("cpu, 2 threads", ["--threads", 2, "--batch", 8], "0,1"),
    ("cuda", ["--provider", "cuda", "--batch", 32], None),
):
    run(["attribute", wide, "--data", folder, "-o", work / "warm.npz", *extra], pin)  # warm-up
    _, seconds = run(["attribute", wide, "--data", folder, "-o", work / f"{name[:4]}.npz", *extra], pin)
    speed[name] = images / seconds
    print(f"attribute {wide.name} {images} images, {name}: {speed[name]:.1f} img/s")
ratio = speed["cuda"] / speed["cpu, 2 threads"]
print(f"CUDA / 2-core CPU: {ratio:.1f}x (target >= 10)")

sub, distilled = work / "sub.onnx", work / "sub_distilled.onnx"
run(["extract", wide, "--scores", work / "cuda.npz", "--classes", "3,5", "--flops", 0.5,
     "--round-to", 8, "--reconstruct", root / "samples/data/digit_scenes/unlabeled", "-o", sub])
_, seconds = run(["distill", sub, "--teacher", wide, "--data",
                  root / "samples/data/digit_scenes/unlabeled", "-o", distilled,
                  "--provider", "cuda", "--batch", 32])
print(f"distill one epoch (1,000 scenes) on CUDA: {seconds:.1f} s")
val = root / "samples/data/digit_scenes/val"
for model in (wide, sub, distilled):
    out, _ = run(["eval", model, "--data", val / "images", "--masks", val / "masks",
                  "--classes", "3,5", "--provider", "cuda", "--json"])
    r = json.loads(out)
    print(f"eval {model.name} on CUDA: miou {r['miou']:.4f}, FLOPs {r['flops']:.3g}, "
          f"latency {r['latency_ms']:.3f} ms")

# TensorRT: onnxruntime's provider builds the engine in the first session.
lat = {}
for model in (wide, distilled):
    try:
        out, _ = run(["eval", model, "--data", val / "images", "--masks", val / "masks",
                      "--classes", "3,5", "--provider", "tensorrt", "--json", "--runs", 200])
    except subprocess.CalledProcessError as e:
        print(f"TensorRT provider on {model.name}: failed ({e.stderr.strip()[:300]})")
        break
    lat[model.name] = json.loads(out)
if len(lat) == 2:
    a, b = lat[wide.name], lat[distilled.name]
    print(f"TensorRT: sub-network latency {b['latency_ms']:.3f} ms vs {a['latency_ms']:.3f} ms "
          f"= {b['latency_ms'] / a['latency_ms']:.3f} of the original, FLOPs "
          f"{b['flops'] / a['flops']:.3f}; miou {b['miou']:.4f} vs {a['miou']:.4f}")
if shutil.which("trtexec"):
    for model in (wide, distilled):
        out = subprocess.run(["trtexec", f"--onnx={model}", "--shapes=input:1x3x64x64"],
                             capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if "GPU Compute Time" in l or "Throughput" in l]
        print(f"trtexec {model.name}: rc {out.returncode}; " + " | ".join(l.split("]")[-1].strip() for l in lines))
else:
    print("trtexec not on PATH: engine built through onnxruntime's TensorRT provider only")
EOF
