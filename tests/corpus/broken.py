"""Broken inputs for the fault matrix: model files, image folders, plans and scores files.

Each generator writes one faulty file (or folder) from a good one and returns its path;
the `random` ones take a seeded generator, so a case is the same file on every run.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


# -- model files ---------------------------------------------------------------------------
def zero_length(good: Path, out: Path) -> Path:
    out.write_bytes(b"")
    return out


def truncated(good: Path, out: Path, rng: np.random.Generator) -> Path:
    data = good.read_bytes()
    out.write_bytes(data[: int(rng.integers(1, len(data)))])
    return out


def _weight_bytes(model: onnx.ModelProto, data: bytes) -> np.ndarray:
    """Which bytes of the serialised model are initializer payloads."""
    inside = np.zeros(len(data), bool)
    for t in model.graph.initializer:
        if t.raw_data:
            start = data.find(t.raw_data)
            inside[start : start + len(t.raw_data)] = True
    return inside


def bit_flipped(good: Path, out: Path, rng: np.random.Generator, parses: bool) -> Path:
    """One bit flipped outside the weights' bytes (a flip inside them is another model, not a
    broken one); `parses` picks a flip after which protobuf still parses the file, or not."""
    data = good.read_bytes()
    candidates = np.flatnonzero(~_weight_bytes(onnx.load(good), data))
    for _ in range(10_000):
        pos, bit = int(rng.choice(candidates)), int(rng.integers(8))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << bit
        try:
            onnx.load_from_string(bytes(flipped))
            ok = True
        except Exception:
            ok = False
        if ok == parses:
            out.write_bytes(bytes(flipped))
            return out
    raise AssertionError("no such flip found")


def text(good: Path, out: Path) -> Path:
    out.write_text("# exported with care\nname: model\ninputs: [input]\n")
    return out


def _edit(good: Path, out: Path, change) -> Path:
    model = onnx.load(good)
    change(model)
    out.write_bytes(model.SerializeToString())
    return out


def cyclic(good: Path, out: Path) -> Path:
    """The first node reads the output of a later one: a cycle through the graph."""

    def change(model: onnx.ModelProto) -> None:
        nodes = model.graph.node
        relu = next(n for n in nodes[1:] if n.op_type == "Relu")
        first_conv = next(n for n in nodes if n.op_type == "Conv")
        first_conv.input[0] = relu.output[0]

    return _edit(good, out, change)


def output_twice(good: Path, out: Path) -> Path:
    """Two nodes write one tensor name."""

    def change(model: onnx.ModelProto) -> None:
        relus = [n for n in model.graph.node if n.op_type == "Relu"]
        relus[1].output[0] = relus[0].output[0]

    return _edit(good, out, change)


def huge_input_dim(good: Path, out: Path) -> Path:
    """The image input declared 2^31 pixels high."""

    def change(model: onnx.ModelProto) -> None:
        model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 2**31

    return _edit(good, out, change)


def huge_initializer_dim(good: Path, out: Path) -> Path:
    """A weight whose dims claim 2^31 elements while holding a few."""

    def change(model: onnx.ModelProto) -> None:
        model.graph.initializer[0].dims[0] = 2**31

    return _edit(good, out, change)


def external(good: Path, out: Path, location: str, write_data: bool) -> Path:
    """Weights moved to external data at `location` (relative to the model's folder)."""
    model = onnx.load(good)
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    payload = tensor.raw_data
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(payload)))):
        tensor.external_data.append(onnx.StringStringEntryProto(key=key, value=value))
    out.write_bytes(model.SerializeToString())
    if write_data:
        target = out.parent / location
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
    return out


# -- images and masks ----------------------------------------------------------------------
def unreadable_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00000.png").write_text("not a picture")
    return folder


def zero_size_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "00000.png").write_bytes(b"")
    return folder


def huge_images(folder: Path) -> Path:
    """A PNG whose header says 100000 x 100000 pixels (30 GB decoded), then ends."""
    import struct
    import zlib

    folder.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
    png += struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    (folder / "00000.png").write_bytes(png)
    return folder


def masks_of_another_size(images: Path, folder: Path) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.glob("*.png")):
        cv2.imwrite(str(folder / path.name), np.zeros((5, 7), np.uint8))
    return folder


def masks_with_unknown_labels(images: Path, folder: Path, label: int = 200) -> Path:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.glob("*.png")):
        h, w = cv2.imread(str(path)).shape[:2]
        cv2.imwrite(str(folder / path.name), np.full((h, w), label, np.uint8))
    return folder


def plan_text(out: Path, content: str) -> Path:
    out.write_text(content)
    return out


def plan_edit(good: Path, out: Path, change) -> Path:
    plan = json.loads(good.read_text())
    change(plan)
    out.write_text(json.dumps(plan))
    return out


# -- scores files --------------------------------------------------------------------------
def _scores(good: Path) -> dict[str, np.ndarray]:
    with np.load(good, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def scores_edit(good: Path, out: Path, change) -> Path:
    arrays = _scores(good)
    change(arrays)
    with open(out, "wb") as f:
        np.savez(f, **arrays)
    return out


def scores_meta_edit(good: Path, out: Path, change) -> Path:
    def edit(arrays: dict[str, np.ndarray]) -> None:
        meta = json.loads(str(arrays["meta"]))
        change(meta)
        arrays["meta"] = np.array(json.dumps(meta))

    return scores_edit(good, out, edit)


def scores_with_pickle(good: Path, out: Path) -> Path:
    arrays = _scores(good)
    arrays["meta"] = np.array([{"format": "x"}], dtype=object)
    with open(out, "wb") as f:
        np.savez(f, **arrays)
    return out


def scores_zip_of_text(out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("meta.npy", "not an array")
    return out


def constant_model(out: Path) -> Path:
    """A valid model without a single parameter layer (for 'plan from another model')."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 16, 16])
    two = numpy_helper.from_array(np.float32(2.0), "two")
    graph = helper.make_graph([helper.make_node("Mul", ["input", "two"], ["y"])], "g", [x], [y])
    graph.initializer.append(two)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), out)
    return out
