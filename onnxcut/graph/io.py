"""Load real exports robustly, save atomically, and index a graph by tensor name.

Every command loads through `load()`, so odd exports (weights in Constant nodes, IR-3
initializer inputs, dynamic shapes, external data) are normalised in one place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, NodeProto, TensorProto, external_data_helper, numpy_helper

from onnxcut.errors import ModelError, OutputError
from onnxcut.graph.checks import check_attributes, check_graph, check_input_sizes
from onnxcut.graph.shapes import (
    declare_types_inplace,
    dims,
    fix_input_shapes_inplace,
    graph_inputs,
    infer_shapes,
)

log = logging.getLogger(__name__)

MIN_OPSET = 9
MAX_OPSET = onnx.defs.onnx_opset_version()
FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
)


def load(
    model: str | os.PathLike[str] | ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> ModelProto:
    """Load and normalise a model: fold constants, name nodes, fix shapes, infer shapes.

    Returns a new ModelProto; a ModelProto argument is copied, never changed.
    """
    if isinstance(model, ModelProto):
        proto = ModelProto()
        proto.CopyFrom(model)
        _check_external(proto, None, "<in-memory model>")
        source = "<in-memory model>"
    else:
        proto = _read(Path(model))
        source = str(model)
    _check_structure(proto, source)
    name_nodes_inplace(proto)
    check_graph(proto, source)
    check_attributes(proto, source)
    fold_constants_inplace(proto)
    declare_types_inplace(proto)
    if input_shapes:
        fix_input_shapes_inplace(proto, input_shapes)
    check_input_sizes(proto, source)
    return infer_shapes(proto)


def _read(path: Path) -> ModelProto:
    if not path.exists():
        raise ModelError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise ModelError(f"{path}: not a file; pass the .onnx model file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty file; re-export the model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(
            f"{path}: not an ONNX model (protobuf parse failed: {e}); "
            "check that the file is a complete .onnx export"
        ) from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror}); check permissions") from None
    _check_external(proto, path.parent, str(path))
    return proto


def _check_external(proto: ModelProto, base: Path | None, source: str) -> None:
    """Refuse external data that escapes the model's folder, then load it."""
    external = [
        t
        for t in external_data_helper._get_all_tensors(proto)
        if external_data_helper.uses_external_data(t)
    ]
    if not external:
        return
    if base is None:
        raise ModelError(
            f"{source}: tensor '{external[0].name}' keeps its data in an external file; "
            "load the model from its path instead"
        )
    root = os.path.realpath(base)
    for tensor in external:
        info = external_data_helper.ExternalDataInfo(tensor)
        target = os.path.realpath(os.path.join(root, info.location))
        if os.path.isabs(info.location) or os.path.commonpath([root, target]) != root:
            raise ModelError(
                f"{source}: tensor '{tensor.name}' has external data location "
                f"'{info.location}' outside the model folder; move the data file next to "
                "the model and re-save it"
            )
        if not os.path.isfile(target):
            raise ModelError(
                f"{source}: tensor '{tensor.name}' needs external data file "
                f"'{info.location}', which is missing; copy it next to the model"
            )
    try:
        external_data_helper.load_external_data_for_model(proto, str(root))
    except (OSError, ValueError) as e:
        raise ModelError(f"{source}: cannot read external data ({e})") from None


def _check_structure(proto: ModelProto, source: str) -> None:
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.node:
        raise ModelError(
            f"{source}: parsed as protobuf but holds no ONNX graph; "
            "check that the file is an .onnx model"
        )
    opset = opset_version(proto)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(
            f"{source}: default-domain opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}; "
            "convert it with onnx.version_converter.convert_version(model, 17)"
        )


def copy_model(model: ModelProto) -> ModelProto:
    """A deep copy, for a pass that changes the graph while the caller keeps the original."""
    new = ModelProto()
    new.CopyFrom(model)
    return new


def opset_version(model: ModelProto) -> int:
    """Return the default-domain ("" or "ai.onnx") opset version."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1 if model.ir_version < 3 else 0


def name_nodes_inplace(model: ModelProto) -> ModelProto:
    """Give every unnamed or duplicate-named node a unique, deterministic name.

    Plans address layers by node name, so names must exist and be unique.
    """
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name
        if not name or name in seen:
            base = node.name or f"{node.op_type}_{i}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        seen.add(name)
    return model


def fold_constants_inplace(model: ModelProto) -> ModelProto:
    """Turn Constant nodes, ConstantOfShape of a known shape and Identity of an initializer
    into initializers.

    PaddlePaddle and some converters keep weights in Constant nodes, and the PyTorch exporter
    shares equal initializers (zero biases, untrained BatchNorm statistics) through Identity
    nodes; after this every weight is an initializer of its own, which is all the later
    passes read, and slicing one layer's copy leaves the others alone.
    """
    graph = model.graph
    known = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    keep: list[NodeProto] = []
    added: list[TensorProto] = []
    for node in graph.node:
        tensor = None
        if node.output and node.output[0] not in graph_outputs:
            if node.op_type == "Constant" and not node.input:
                tensor = _constant_value(node)
            elif node.op_type == "ConstantOfShape" and node.input[0] in known:
                tensor = _constant_of_shape(node, known[node.input[0]])
            elif node.op_type == "Identity" and node.input[0] in known:
                tensor = TensorProto()
                tensor.CopyFrom(known[node.input[0]])
        if tensor is None:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        added.append(tensor)
        known[tensor.name] = tensor
    if not added:
        return model
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(added)
    return model  # load() declares them as graph inputs where the IR version wants it


def _constant_value(node: NodeProto) -> TensorProto | None:
    attr = {a.name: a for a in node.attribute}
    if "value" in attr:
        out = TensorProto()
        out.CopyFrom(attr["value"].t)
        return out
    scalars = {
        "value_float": lambda a: numpy_helper.from_array(np.array(a.f, np.float32)),
        "value_floats": lambda a: numpy_helper.from_array(np.array(a.floats, np.float32)),
        "value_int": lambda a: numpy_helper.from_array(np.array(a.i, np.int64)),
        "value_ints": lambda a: numpy_helper.from_array(np.array(a.ints, np.int64)),
    }
    for key, make in scalars.items():
        if key in attr:
            return make(attr[key])
    return None  # sparse_value or string constants stay as nodes


def _constant_of_shape(node: NodeProto, shape_init: TensorProto) -> TensorProto:
    shape = numpy_helper.to_array(shape_init).astype(np.int64)
    value = np.zeros(1, np.float32)
    for a in node.attribute:
        if a.name == "value":
            value = numpy_helper.to_array(a.t).reshape(-1)
    return numpy_helper.from_array(np.full(tuple(shape), value[0], dtype=value.dtype))


def _numel(t: TensorProto) -> int:
    return int(np.prod(t.dims)) if t.dims else 1


class GraphIndex:
    """Producers, consumers, constants and shapes of a model's main graph, by tensor name."""

    def __init__(self, model: ModelProto):
        self.model = model
        self.graph = model.graph
        self.nodes: dict[str, NodeProto] = {n.name: n for n in model.graph.node}
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
        self.value_info: dict[str, onnx.ValueInfoProto] = {}
        for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
            self.value_info.setdefault(v.name, v)
        self.outputs = [o.name for o in model.graph.output]
        self.inputs = [i.name for i in graph_inputs(model)]
        self._arrays: dict[str, np.ndarray] = {}

    def const(self, name: str) -> np.ndarray | None:
        """Return an initializer as an array (cached), or None for a computed tensor."""
        if name not in self.initializers:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.initializers[name])
        return self._arrays[name]

    def shape(self, name: str) -> list[int | str] | None:
        """Return a tensor's dims (ints where static), or None where unknown."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        v = self.value_info.get(name)
        return dims(v) if v is not None else None

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        d = self.shape(name)
        if d is None or not all(isinstance(x, int) and x > 0 for x in d):
            return None
        return tuple(int(x) for x in d)

    def dtype(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        v = self.value_info.get(name)
        return v.type.tensor_type.elem_type if v is not None else None

    def descendants(
        self, start: Iterable[str], keep: Callable[[str], bool] | None = None
    ) -> set[str]:
        """`start` and the tensors computed from it (only through those `keep` accepts)."""
        found = set(start)
        for node in self.graph.node:
            if any(i in found for i in node.input if i):
                found.update(o for o in node.output if o and (keep is None or keep(o)))
        return found

    def ancestors(self, names: Iterable[str]) -> set[str]:
        """`names` and the tensors they are computed from."""
        found = set(names)
        for node in reversed(self.graph.node):
            if any(o in found for o in node.output if o):
                found.update(i for i in node.input if i)
        return found


def expose_tensors(model: ModelProto, names: Iterable[str]) -> ModelProto:
    """Return a copy whose graph outputs also include the given intermediate tensors."""
    new = copy_model(model)
    index = GraphIndex(new)
    have = set(index.outputs)
    for name in dict.fromkeys(names):
        if name in have:
            continue
        if name not in index.producer and name not in index.inputs:
            raise ModelError(f"tensor '{name}' is not in the graph; list tensors with inspect")
        new.graph.output.append(
            onnx.helper.make_tensor_value_info(name, index.dtype(name) or TensorProto.FLOAT, None)
        )
    return new


def attrs(node: NodeProto) -> dict[str, object]:
    """Return a node's attributes as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def save(model: ModelProto, path: str | os.PathLike[str], *, source: str | None = None) -> Path:
    """Write a model atomically: to a temporary file beside `path`, then rename.

    Models over 2 GB are written with their weights in `<name>.data` beside the model.
    `source` is the input model's path; writing over it is refused.
    """
    path = Path(path)
    _check_writable(path, source)
    try:
        model.ByteSize()
        large = False
    except Exception:  # protobuf cannot measure, let alone serialise, past 2 GB
        large = True
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if large:
            data_name = f"{path.name}.data"
            tmp_data = f"{Path(tmp).name}.data"
            onnx.save(model, tmp, save_as_external_data=True, location=tmp_data)
            # The rename of the data file is made before the model that points at it.
            final = onnx.load(tmp, load_external_data=False)
            for t in external_data_helper._get_all_tensors(final):
                if external_data_helper.uses_external_data(t):
                    for entry in t.external_data:
                        if entry.key == "location":
                            entry.value = data_name
            os.replace(path.parent / tmp_data, path.parent / data_name)
            onnx.save(final, tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_writable(path: Path, source: str | None) -> None:
    parent = path.parent
    if source is not None and path.exists() and os.path.samefile(path, source):
        raise OutputError(f"{path}: output is the input model; choose another -o path")
    if not parent.is_dir():
        raise OutputError(f"{path}: folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: folder '{parent}' is not writable; choose another -o path")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name such as {path}/model.onnx")


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically (temporary file beside it, then rename)."""
    path = Path(path)
    _check_writable(path, None)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_bytes(model: ModelProto) -> bytes:
    """Serialise a model for onnxruntime (callers needing > 2 GB save it to a path instead)."""
    return model.SerializeToString()
