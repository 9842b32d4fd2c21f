"""VJP rules for ops that move values without arithmetic: concat, slice, reshape, resize."""

from __future__ import annotations

import numpy as np

from onnxcut.errors import UnsupportedOpError
from onnxcut.grad.emitter import Emitter, Site, decoded
from onnxcut.grad.registry import vjp


def _axis(s: Site, rank: int, default: int = 0) -> int:
    return int(s.attrs.get("axis", default)) % rank


def _constant(g: Emitter, s: Site, i: int, what: str) -> np.ndarray | None:
    """A constant input's value; a computed one is an error naming the node."""
    name = s.input(i)
    if name is None:
        return None
    value = g.value(name)
    if value is None:
        raise UnsupportedOpError(s.node, f"computed {what} ('{name}') have no VJP rule")
    return value.reshape(-1)


@vjp("Concat")
def concat(g: Emitter, s: Site):
    axis = _axis(s, g.rank(s.x, s.node))
    shapes = [g.static_shape(i, s.node, [axis]) for i in s.node.input]
    sizes = [shape[axis] for shape in shapes]
    if len(sizes) == 1:
        return (s.g,)
    return tuple(g.op("Split", [s.g, g.ints(sizes)], n_out=len(sizes), axis=axis))


@vjp("Split")
def split(g: Emitter, s: Site):
    axis = _axis(s, g.rank(s.x, s.node))
    parts = [
        dy if dy is not None else g.zeros_like(out)
        for dy, out in zip(s.dy, s.node.output, strict=True)
    ]
    return (parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=axis), None)


@vjp("Slice")
def slice_(g: Emitter, s: Site):
    starts, ends = _constant(g, s, 1, "starts"), _constant(g, s, 2, "ends")
    axes = _constant(g, s, 3, "axes")
    steps = _constant(g, s, 4, "steps")
    rank = g.rank(s.x, s.node)
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
    xs = g.static_shape(s.x, s.node, axes)
    steps = [1] * len(starts) if steps is None else [int(v) for v in steps]
    pads = [0] * (2 * len(xs))
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        if step != 1:
            raise UnsupportedOpError(s.node, f"Slice with step {step} has no VJP rule")
        begin, stop, _ = slice(int(start), int(end)).indices(xs[axis])
        pads[axis] = begin
        pads[len(xs) + axis] = xs[axis] - max(stop, begin)
    return (g.op("Pad", [s.g, g.ints(pads)]), None, None, None, None)


@vjp("Pad")
def pad(g: Emitter, s: Site):
    mode = decoded(s.attrs.get("mode", "constant"))
    if mode != "constant":
        raise UnsupportedOpError(s.node, f"Pad mode '{mode}' has no VJP rule")
    rank = g.rank(s.x, s.node)
    pads = s.attrs.get("pads")
    pads = [int(p) for p in (pads if pads is not None else _constant(g, s, 1, "pads"))]
    axes = _constant(g, s, 3, "axes")
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    n = len(axes)
    begins, ends = pads[:n], pads[n:]
    dy = s.g
    if min(pads) < 0:  # the forward cropped there: pad the gradient back with zeros
        grow = [0] * (2 * rank)
        for k, a in enumerate(axes):
            grow[a], grow[rank + a] = max(-begins[k], 0), max(-ends[k], 0)
        dy = g.op("Pad", [dy, g.ints(grow)])
    # Slice only the padded axes: an untouched batch axis holds K category copies.
    moved = [k for k in range(n) if begins[k] or ends[k]]
    if not moved:
        return (dy, None, None, None)
    ys = g.static_shape(s.y, s.node, [axes[k] for k in moved])
    starts = [max(begins[k], 0) for k in moved]
    stops = [ys[axes[k]] + max(-begins[k], 0) + max(-ends[k], 0) - max(ends[k], 0) for k in moved]
    dx = g.op("Slice", [dy, g.ints(starts), g.ints(stops), g.ints([axes[k] for k in moved])])
    return (dx, None, None, None)


@vjp("Gather")
def gather(g: Emitter, s: Site):
    """Scatter-add dy back to the gathered positions (repeated indices add up)."""
    data, indices = s.node.input[:2]
    xs = g.static_shape(data, s.node)
    rank = len(xs)
    axis = int(s.attrs.get("axis", 0)) % rank
    value = g.value(indices)
    if value is None:
        raise UnsupportedOpError(s.node, f"computed indices ('{indices}') have no VJP rule")
    if xs[axis] < 0:
        raise UnsupportedOpError(s.node, "gathering along a dynamic axis has no VJP rule")
    flat = np.where(value < 0, value + xs[axis], value).astype(np.int64).reshape(-1)
    # dy is xs[:axis] + indices.shape + xs[axis+1:]: merge the index axes into one.
    lead = [-1, *xs[1:axis]] if axis > 0 else []
    dy = g.op("Reshape", [s.g, g.ints([*lead, flat.size, *xs[axis + 1 :]])])
    spots = g.ints(flat.reshape([1] * axis + [flat.size] + [1] * (rank - axis - 1)))
    spots = g.op("Expand", [spots, g.op("Shape", [dy])])
    dx = g.op("ScatterElements", [g.zeros_like(data), spots, dy], axis=axis, reduction="add")
    return (dx, None)


@vjp("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(g: Emitter, s: Site):
    return (g.op("Reshape", [s.g, g.reshape_target(s.x)]), None)


@vjp("Transpose")
def transpose(g: Emitter, s: Site):
    perm = s.attrs.get("perm") or list(reversed(range(g.rank(s.x, s.node))))
    return (g.op("Transpose", [s.g], perm=[int(i) for i in np.argsort(perm)]),)


@vjp("Expand", broadcast=True)
def expand(g: Emitter, s: Site):
    return (s.g, None)


@vjp("Resize")
def resize(g: Emitter, s: Site):
    xs = g.static_shape(s.x, s.node)
    ys = g.static_shape(s.y, s.node)
    if xs[:2] != ys[:2] or len(xs) not in (3, 4):
        raise UnsupportedOpError(
            s.node, "only Resize of the spatial axes of 3-D or 4-D tensors has a VJP rule"
        )
    mode = decoded(s.attrs.get("coordinate_transformation_mode", "half_pixel"))
    if mode == "tf_crop_and_resize":
        raise UnsupportedOpError(s.node, "tf_crop_and_resize has no VJP rule")
    # Every Resize mode is separable: y = M_h x M_w^T per plane, so dx = M_h^T dy M_w.
    from onnxcut.grad.interpolation import interpolation_matrices

    matrices = interpolation_matrices(g, s, xs, ys)
    dx = g.op("MatMul", [s.g, g.array(matrices[-1], s.y)])
    if len(matrices) == 2:
        dx = g.op("MatMul", [g.array(np.ascontiguousarray(matrices[0].T), s.y), dx])
    return (dx, None, None, None)
