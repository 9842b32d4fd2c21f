"""GradientSession: one backward graph and one onnxruntime session, reused per image.

The objective is S = sum over a mask of `output` taken at a category along `axis`. The seed
dS/d(output) is built in the graph from two inputs: `categories` (K,) and `mask` with a
leading K (or 1) axis, so K categories of one batch share one forward pass; the backward
batch holds K copies of the forward batch, category-major. Categories may also be (K, N):
slot k then takes its own category for each of the N images of the batch, so images with
different categories share one backward run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from onnxcut.errors import BatchError, DataError, ModelError
from onnxcut.grad.backward import backward, prepare
from onnxcut.graph.io import GraphIndex, load
from onnxcut.graph.shapes import infer_shapes
from onnxcut.runtime import session

log = logging.getLogger(__name__)

CATEGORIES = "onnxcut_categories"
MASK = "onnxcut_mask"
_NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64}


@dataclass
class GradientResult:
    activations: dict[str, np.ndarray]  # name -> (N, C, ...) forward values
    gradients: dict[str, np.ndarray]  # name -> (K, N, C, ...) dS_k / d tensor


class GradientSession:
    """Build the backward graph of `output` w.r.t. `wrt` once; run it for many inputs.

    Args:
        model: a path or ModelProto.
        wrt: intermediate tensor names to differentiate with respect to.
        output: the tensor the objective reads; `axis` (negative allowed) is its category axis.
        input_shapes: fixes dynamic input dims, as `--input-shape` does.
        forward_outputs: split the graph in two sessions, so `forward()` runs the forward half
            once (returning these tensors too, for example the probabilities that decide the
            masks) and `backward()` runs only the backward half. Without it one session runs
            both, which is faster when categories and masks are known before the forward pass.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | ModelProto,
        wrt: Sequence[str],
        output: str,
        axis: int = 1,
        *,
        provider: str = "cpu",
        threads: int | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        forward_outputs: Sequence[str] | None = None,
    ):
        proto = prepare(load(model, input_shapes))
        index = GraphIndex(proto)
        if output not in index.producer and output not in index.inputs:
            raise ModelError(f"output '{output}' is not a tensor of the graph")
        shape = index.shape(output)
        if shape is None:
            raise ModelError(f"output '{output}' has unknown rank; pass --input-shape NAME:1x3xHxW")
        self.rank = len(shape)
        if not -self.rank <= axis < self.rank:
            raise DataError(
                f"axis {axis} is out of range for output '{output}' of rank {self.rank}"
            )
        self.axis = axis % self.rank
        self.classes = shape[self.axis]
        if not isinstance(self.classes, int) or self.classes <= 0:
            raise ModelError(
                f"output '{output}' has a dynamic size along axis {axis}; pass --input-shape"
            )
        self.output, self.wrt = output, list(wrt)
        self.out_shape = shape
        self.dtype = _NP.get(index.dtype(output) or TensorProto.FLOAT, np.float32)
        with_seed, seed = _add_objective(proto, index, output, self.axis, self.classes)
        try:
            graph, grads = backward(with_seed, output, self.wrt, seed, repeats=_K)
            self.batched = True
        except BatchError as e:
            log.info("%s", e)
            graph, grads = backward(with_seed, output, self.wrt, seed)
            self.batched = False
        self.grad_names = [grads[name] for name in self.wrt]
        del graph.graph.output[:]
        graph.graph.output.extend(
            helper.make_tensor_value_info(n, index.dtype(w) or TensorProto.FLOAT, None)
            for n, w in [*((w, w) for w in self.wrt), *zip(self.grad_names, self.wrt, strict=True)]
        )
        self.model = graph
        self.outputs = [*self.wrt, *self.grad_names]
        self.split = forward_outputs is not None
        if not self.split:
            self.session = session(graph, provider=provider, threads=threads)
            return
        known = set(GraphIndex(graph).producer) | {i.name for i in graph.graph.input}
        for name in forward_outputs:
            if name not in known:
                raise ModelError(f"forward output '{name}' is not a tensor of the graph")
        first, second, self.boundary = _split(graph, [*forward_outputs, *self.wrt], self.grad_names)
        self.forward_names = [o.name for o in first.graph.output]
        self.forward_session = session(first, provider=provider, threads=threads)
        self.backward_session = session(second, provider=provider, threads=threads)

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        categories: Sequence[int],
        masks: np.ndarray | Sequence[np.ndarray] | None = None,
    ) -> GradientResult:
        """Return activations (N, ...) and gradients (K, N, ...) for K categories.

        `categories` is (K,), or (K, N) for a category per slot and image. `masks` is None
        (sum everything), one array for every category, or a list of K arrays; each
        broadcasts against the output with the category axis taken out.
        """
        cats = self._categories(categories)
        if self.split:
            return self.backward(feeds, self.forward(feeds), cats, masks)
        mask = self._masks(feeds, masks, len(cats))
        if self.batched:
            values = self.session.run(self.outputs, {**feeds, CATEGORIES: cats, MASK: mask})
            return self._result(values, len(cats))
        runs = [
            self.session.run(
                self.outputs,
                {**feeds, CATEGORIES: cats[k : k + 1], MASK: mask[min(k, len(mask) - 1)][None]},
            )
            for k in range(len(cats))
        ]
        n = len(self.wrt)
        stacked = runs[0][:n] + [np.concatenate([r[n + i] for r in runs]) for i in range(n)]
        return self._result(stacked, len(cats))

    def forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the forward half (a session built with `forward_outputs`): every forward
        output, activation and value the backward half reads, by name."""
        assert self.split, "forward() needs a GradientSession built with forward_outputs"
        values = self.forward_session.run(self.forward_names, dict(feeds))
        # Graph inputs asked for (an image a relevance route reads) come from the feeds.
        return {**feeds, **dict(zip(self.forward_names, values, strict=True))}

    def backward(
        self,
        feeds: Mapping[str, np.ndarray],
        forward: Mapping[str, np.ndarray],
        categories: Sequence[int],
        masks: np.ndarray | Sequence[np.ndarray] | None = None,
    ) -> GradientResult:
        """Gradients for K categories from the values `forward(feeds)` returned."""
        assert self.split, "backward() needs a GradientSession built with forward_outputs"
        cats = self._categories(categories)
        mask = self._masks(feeds, masks, len(cats))
        given = {n: forward[n] if n in forward else feeds[n] for n in self.boundary}
        acts = [forward[name] for name in self.wrt]
        if self.batched:
            grads = self.backward_session.run(
                self.grad_names, {**given, CATEGORIES: cats, MASK: mask}
            )
            return self._result(acts + grads, len(cats))
        runs = [
            self.backward_session.run(
                self.grad_names,
                {**given, CATEGORIES: cats[k : k + 1], MASK: mask[min(k, len(mask) - 1)][None]},
            )
            for k in range(len(cats))
        ]
        grads = [np.concatenate([r[i] for r in runs]) for i in range(len(self.wrt))]
        return self._result(acts + grads, len(cats))

    def _categories(self, categories) -> np.ndarray:
        """Categories as (K, 1), or (K, N) when given per image."""
        cats = np.asarray(categories, np.int64)
        cats = cats.reshape(-1, 1) if cats.ndim < 2 else cats
        if cats.ndim != 2 or (cats.shape[1] != 1 and self.axis == 0):
            raise DataError(
                f"categories of shape {cats.shape}: pass (K,) or, per image, (K, N) "
                "(not with the category axis 0)"
            )
        if cats.size == 0:
            raise DataError("no categories given; pass at least one category index")
        bad = cats[(cats < 0) | (cats >= self.classes)]
        if bad.size:
            raise DataError(
                f"category {int(bad[0])} is out of range: output '{self.output}' has "
                f"{self.classes} categories along axis {self.axis} (0..{self.classes - 1})"
            )
        return cats

    def _result(self, values: list[np.ndarray], k: int) -> GradientResult:
        n = len(self.wrt)
        acts = dict(zip(self.wrt, values[:n], strict=True))
        # Gradients arrive as (K*N, ...) or, batched, (K, N, ...); both hold K copies of N.
        grads = {
            name: g.reshape(k, *acts[name].shape)
            for name, g in zip(self.wrt, values[n:], strict=True)
        }
        return GradientResult(acts, grads)

    def _masks(self, feeds, masks, k: int) -> np.ndarray:
        """Return masks as (K or 1, *output shape with 1 on the category axis)."""
        out = list(self.out_shape)
        if not isinstance(out[0], int) or out[0] <= 0:
            first = next(iter(feeds.values()), None)
            out[0] = int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1
        taken = [d for i, d in enumerate(out) if i != self.axis]
        if masks is None:
            return np.ones((1,) + (1,) * self.rank, self.dtype)
        listed = list(masks) if isinstance(masks, (list, tuple)) else [masks]
        if len(listed) not in (1, k):
            raise DataError(f"{len(listed)} masks for {k} categories; pass one mask or one each")
        shaped = []
        for m in listed:
            m = np.asarray(m, self.dtype)
            try:
                np.broadcast_shapes(m.shape, tuple(taken))
            except ValueError:
                raise DataError(
                    f"mask of shape {m.shape} does not broadcast against output "
                    f"'{self.output}' without its category axis, {tuple(taken)}"
                ) from None
            m = m.reshape((1,) * (len(taken) - m.ndim) + m.shape)
            shaped.append(np.expand_dims(m, self.axis))
        common = np.broadcast_shapes(*(m.shape for m in shaped))
        return np.stack([np.broadcast_to(m, common) for m in shaped])


_K = "onnxcut_num_categories"


def _add_objective(
    proto: ModelProto, index: GraphIndex, output: str, axis: int, classes: int
) -> tuple[ModelProto, str]:
    """Add the category and mask inputs and the seed dS/d(output) they define."""
    model = ModelProto()
    model.CopyFrom(proto)
    dtype = index.dtype(output) or TensorProto.FLOAT
    np_dtype = _NP.get(dtype, np.float32)
    rank = len(index.shape(output) or [])
    g = model.graph
    g.input.extend(
        [
            helper.make_tensor_value_info(CATEGORIES, TensorProto.INT64, ["K", "N_categories"]),
            helper.make_tensor_value_info(MASK, dtype, [f"mask_{i}" for i in range(rank + 1)]),
        ]
    )
    consts = {
        "objective/depth": np.asarray([classes], np.int64),
        "objective/values": np.asarray([0, 1], np_dtype),
        # (K, N or 1, classes) -> (K, N or 1, ...) with classes on the category axis; Reshape's
        # 0 copies a dim. A category axis 0 leaves no batch axis: N is 1 there.
        "objective/onehot_shape": np.asarray(
            [0, 0] + [classes if i == axis else 1 for i in range(1, rank)]
            if axis
            else [0, classes] + [1] * (rank - 1),
            np.int64,
        ),
        "objective/zero": np.asarray([0], np.int64),
        "objective/one": np.asarray([1], np.int64),
        "objective/minus_one": np.asarray([-1], np.int64),
        "objective/end": np.asarray([np.iinfo(np.int64).max], np.int64),
    }
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    nodes = [
        ("Shape", [CATEGORIES], "objective/categories_shape", {}),
        ("Gather", ["objective/categories_shape", "objective/zero"], _K, {"axis": 0}),
        (
            "OneHot",
            [CATEGORIES, "objective/depth", "objective/values"],
            "objective/onehot",
            {"axis": -1},
        ),
        ("Reshape", ["objective/onehot", "objective/onehot_shape"], "objective/onehot_r", {}),
        ("Mul", ["objective/onehot_r", MASK], "objective/masked", {}),
        ("Shape", [output], "objective/out_shape", {}),
        ("Concat", ["objective/one", "objective/out_shape"], "objective/expand_shape", {"axis": 0}),
        ("Expand", ["objective/masked", "objective/expand_shape"], "objective/seed_k", {}),
        ("Slice", ["objective/out_shape", "objective/one", "objective/end"], "objective/tail", {}),
        ("Concat", ["objective/minus_one", "objective/tail"], "objective/seed_shape", {"axis": 0}),
        ("Reshape", ["objective/seed_k", "objective/seed_shape"], "objective/seed", {}),
    ]
    g.node.extend(helper.make_node(op, ins, [out], name=out, **kw) for op, ins, out, kw in nodes)
    return model, "objective/seed"


def _split(
    model: ModelProto, keep: Sequence[str], grads: Sequence[str]
) -> tuple[ModelProto, ModelProto, list[str]]:
    """Cut the gradient graph where the category and mask inputs enter.

    Returns the forward half (outputs: `keep` and every value the backward half reads), the
    backward half (inputs: those values, the categories and the mask) and the names of the
    values crossing the cut.
    """
    graph = model.graph
    index = GraphIndex(infer_shapes(model))  # types of the emitted tensors crossing the cut
    seeded = {CATEGORIES, MASK}
    back, front = [], []
    for node in graph.node:  # topological order: a node after its inputs' producers
        if any(i in seeded for i in node.input):
            seeded.update(o for o in node.output if o)
            back.append(node)
        else:
            front.append(node)
    # IR-3 exports list initializers as inputs too; the backward half reads those itself.
    inits = {t.name for t in graph.initializer}
    produced = {o for n in front for o in n.output} | {
        i.name for i in graph.input if i.name not in inits
    }
    boundary = list(
        dict.fromkeys(i for n in back for i in n.input if i in produced and i not in seeded)
    )
    inputs = {i.name for i in graph.input}
    wanted = [n for n in dict.fromkeys([*keep, *boundary]) if n not in inputs]
    first = _subgraph(
        model, front, [i for i in graph.input if i.name not in (CATEGORIES, MASK)], wanted, index
    )
    second_inputs = [
        next(i for i in graph.input if i.name == name)
        if name in inputs
        else helper.make_tensor_value_info(
            name, index.dtype(name) or TensorProto.FLOAT, index.shape(name)
        )
        for name in boundary
    ] + [i for i in graph.input if i.name in (CATEGORIES, MASK)]
    second = _subgraph(model, back, second_inputs, grads, index)
    return first, second, boundary


def _subgraph(model: ModelProto, nodes, inputs, outputs: Sequence[str], index: GraphIndex):
    """A model of the nodes that `outputs` need, with the initializers they read."""
    needed = set(outputs)
    live = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    inits = [t for t in model.graph.initializer if t.name in needed]
    # An initializer declared as an input (IR 3) that this half does not read would be left
    # as an input without a value.
    dropped = {t.name for t in model.graph.initializer} - needed
    graph = helper.make_graph(
        list(reversed(live)),
        model.graph.name,
        [i for i in inputs if i.name not in dropped],
        [
            helper.make_tensor_value_info(n, index.dtype(n) or TensorProto.FLOAT, None)
            for n in outputs
        ],
        inits,
    )
    sub = helper.make_model(graph, opset_imports=model.opset_import)
    sub.ir_version = model.ir_version
    return sub
