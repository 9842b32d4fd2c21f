"""Emit backward nodes: the helpers every VJP rule builds its ONNX ops with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from onnxcut.errors import BatchError, ModelError
from onnxcut.graph.io import GraphIndex, attrs

_NP_DTYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16,
}


@dataclass
class Site:
    """One forward node being differentiated: its gradients in, and which inputs need one."""

    node: NodeProto
    dy: list[str | None]  # gradient of each output, None where none flows
    needs: list[bool]  # per input: does a requested tensor depend on it
    attrs: dict[str, object] = field(init=False)

    def __post_init__(self) -> None:
        self.attrs = attrs(self.node)

    @property
    def x(self) -> str:
        return self.node.input[0]

    @property
    def y(self) -> str:
        return self.node.output[0]

    @property
    def g(self) -> str:
        """The gradient of the first output (always set for single-output ops)."""
        assert self.dy[0] is not None
        return self.dy[0]

    def input(self, i: int) -> str | None:
        return self.node.input[i] if i < len(self.node.input) and self.node.input[i] else None


class Emitter:
    """Collect backward nodes and constants for one model, with unique names.

    `repeats` names a (1,) int64 tensor K: the backward batch is then K copies of the forward
    batch (one per category), so forward tensors a rule reads are tiled K times along axis 0.
    """

    def __init__(self, index: GraphIndex, varying: set[str], repeats: str | None = None):
        self.index = index
        self.varying = varying  # tensors that depend on a graph input
        self.repeats = repeats
        self.nodes: list[NodeProto] = []
        self.inits: list[TensorProto] = []
        self._taken = set(index.producer) | set(index.initializers) | set(index.value_info)
        self._taken |= {n.name for n in index.graph.node} | {i.name for i in index.graph.input}
        self._tiled: dict[str, str] = {}
        self._repeat_vectors: dict[int, str] = {}
        self._split_targets: dict[str, str] = {}
        # Reshape output -> its (K, N, ...) input: a graph output should be the input, since
        # onnxruntime copies a Reshape whose output leaves the graph.
        self.views: dict[str, str] = {}
        self._batch = None

    # -- naming and emission ------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = f"grad/{hint}"
        name, k = base, 0
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attributes):
        """Emit one node; return its output name (or list of names when n_out > 1)."""
        name = self.fresh(op_type)
        outs = [self.fresh(f"{op_type}_out{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attributes))
        return outs[0] if n_out == 1 else outs

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(values, np.int64), "ints")

    def np_dtype(self, name: str) -> type:
        dtype = self.index.dtype(name) or TensorProto.FLOAT
        return _NP_DTYPES.get(dtype, np.float32)

    def scalar(self, value: float, like: str) -> str:
        """A scalar constant with the float type of tensor `like`."""
        return self.const(np.asarray(value, self.np_dtype(like)), "scalar")

    def array(self, value: np.ndarray, like: str) -> str:
        return self.const(np.asarray(value, self.np_dtype(like)), "array")

    # -- forward values and shapes ----------------------------------------------------------
    def value(self, name: str | None) -> np.ndarray | None:
        """Return a constant input's value, or None for a computed tensor."""
        return None if name is None else self.index.const(name)

    def static_shape(
        self, name: str, node: NodeProto, axes: Sequence[int] | None = None
    ) -> tuple[int, ...]:
        """Return a tensor's shape, -1 for a dynamic batch dim; dynamic elsewhere (or on one
        of `axes`, which the rule reads) is an error naming the flag that fixes it."""
        dims = self.index.shape(name)
        shape = None
        if dims is not None and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)
            if any(shape[a] < 0 for a in axes or ()):
                shape = None
        if shape is None:
            text = "x".join(map(str, dims)) if dims is not None else "unknown"
            raise ModelError(
                f"node '{node.name}' ({node.op_type}): its gradient needs the static shape of "
                f"'{name}', which is {text}; pass --input-shape NAME:1x3xHxW to fix the input"
            )
        return shape

    def rank(self, name: str, node: NodeProto) -> int:
        shape = self.index.shape(name)
        if shape is None:
            raise ModelError(
                f"node '{node.name}' ({node.op_type}): the rank of '{name}' is unknown; "
                "pass --input-shape NAME:1x3xHxW to fix the input"
            )
        return len(shape)

    def fwd(self, name: str) -> str:
        """Return a forward tensor as the backward batch sees it (tiled per category)."""
        if self.repeats is None or name not in self.varying:
            return name
        if name not in self._tiled:
            shape = self.index.shape(name)
            assert shape is not None, f"no shape for '{name}'"
            self.check_batch(name)
            self._tiled[name] = self.op("Tile", [name, self._repeat_vector(len(shape))])
        return self._tiled[name]

    def tile_like(self, name: str, like: str) -> str:
        """Tile an emitted tensor computed from forward tensor `like` as `fwd(like)` would."""
        if self.repeats is None or like not in self.varying:
            return name
        rank = len(self.index.shape(like) or [])
        self.check_batch(like)
        return self.op("Tile", [name, self._repeat_vector(rank)])

    def times(
        self, dy: str, factor: str, like: str, out: str, result: str | None = None, op: str = "Mul"
    ) -> str:
        """`op`(dy, factor): dy is the gradient of forward tensor `out` (backward batch), factor
        was computed on the forward batch like forward tensor `like`; the product has the shape
        of forward tensor `result` (default `out`) in the backward batch.

        With batched categories dy is viewed as (K, N, ...) so the factor broadcasts over K:
        tiling it K times costs a copy per rule, even for K = 1. Reshape is free in onnxruntime.
        """
        if self.repeats is None or like not in self.varying:
            return self.op(op, [dy, factor])
        self.check_batch(like)
        self.check_batch(out)
        if self._batch == 1:  # (K, ...) against (1, ...) broadcasts as it is
            return self.op(op, [dy, factor])
        if len(self.index.shape(like) or []) != len(self.index.shape(out) or [None]):
            return self.op(op, [dy, self.tile_like(factor, like)])
        split = self.op("Reshape", [dy, self.split_target(out)])
        product = self.op(op, [split, factor])
        merged = self.op("Reshape", [product, self.reshape_target(result or out)])
        self.views[merged] = product
        return merged

    def split_target(self, name: str) -> str:
        """A Reshape target viewing a backward-batch tensor shaped like forward tensor `name`
        as (K, *name's forward shape)."""
        if name not in self._split_targets:
            dims = self.index.shape(name)
            if dims is not None and all(isinstance(d, int) and d > 0 for d in dims):
                self._split_targets[name] = self.ints([-1, *dims])
            else:
                shape = self.op("Shape", [name])
                self._split_targets[name] = self.op("Concat", [self.ints([-1]), shape], axis=0)
        return self._split_targets[name]

    def check_batch(self, name: str) -> None:
        """Refuse category batching when a tensor does not keep the batch on axis 0."""
        shape = self.index.shape(name)
        if self._batch is not None and shape and shape[0] != self._batch:
            raise BatchError(
                f"tensor '{name}' does not keep the batch on axis 0 (shape "
                f"{'x'.join(map(str, shape))}); categories run one at a time"
            )

    def set_batch(self, dim: int | str | None) -> None:
        self._batch = dim

    def _repeat_vector(self, rank: int) -> str:
        if rank not in self._repeat_vectors:
            assert self.repeats is not None
            ones = self.ints([1] * (rank - 1))
            self._repeat_vectors[rank] = self.op("Concat", [self.repeats, ones], axis=0)
        return self._repeat_vectors[rank]

    def shape_of(self, name: str) -> str:
        """Return the runtime shape of a forward tensor in the backward batch, as a tensor."""
        shape = self.index.static_shape(name)
        base = self.ints(shape) if shape is not None else self.op("Shape", [name])
        if self.repeats is None or name not in self.varying:
            return base
        rank = len(self.index.shape(name) or [])
        return self.op("Mul", [base, self._repeat_vector(rank)])

    def reshape_target(self, name: str) -> str:
        """A Reshape target giving a forward tensor's shape in the backward batch."""
        dims = self.index.shape(name)
        if dims is None or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
            return self.shape_of(name)
        return self.ints([-1, *dims[1:]])

    # -- common patterns ------------------------------------------------------------------
    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", [a, b])

    def neg(self, a: str) -> str:
        return self.op("Neg", [a])

    def zeros_like(self, name: str) -> str:
        zero = self.scalar(0.0, name)
        return self.op("Expand", [zero, self.shape_of(name)])

    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        if not axes:
            return x
        return self.op("ReduceSum", [x, self.ints(list(axes))], keepdims=int(keepdims))

    def unbroadcast(
        self, dx: str, name: str, out: str | Sequence[int | str], node: NodeProto
    ) -> str:
        """Sum a gradient taken in the broadcast shape `out` (a tensor's) to `name`'s shape."""
        in_shape = self.index.shape(name)
        out_shape = self.index.shape(out) if isinstance(out, str) else list(out)
        if in_shape is None or out_shape is None:
            raise ModelError(
                f"node '{node.name}' ({node.op_type}): broadcasting of '{name}' is unknown; "
                "pass --input-shape NAME:1x3xHxW to fix the input"
            )
        if list(in_shape) == list(out_shape):
            return dx
        lead = len(out_shape) - len(in_shape)
        axes = list(range(lead))
        for i, d in enumerate(in_shape):
            o = out_shape[lead + i]
            if d == 1 and o != 1:
                axes.append(lead + i)
            elif d != o and not isinstance(d, int):
                raise ModelError(
                    f"node '{node.name}' ({node.op_type}): cannot tell how '{name}' "
                    f"broadcasts (dim {d} against {o}); pass --input-shape to fix the input"
                )
        summed = self.reduce_sum(dx, axes, keepdims=True)
        if lead:
            summed = self.op("Reshape", [summed, self.reshape_target(name)])
        return summed


def node_attr(site: Site, name: str, default):
    """Return a node attribute, or `default` where it is absent."""
    return site.attrs.get(name, default)


def decoded(value) -> str:
    """Attribute strings arrive as bytes."""
    return value.decode() if isinstance(value, bytes) else value
