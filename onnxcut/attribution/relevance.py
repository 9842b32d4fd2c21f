"""Model LEGO routes: relevance of each layer's channels to a class, from the output back.

Between adjacent parameter layers (Conv, Gemm, and MatMul with a constant 2-D weight, whose
channels are on the last axis), the contribution of input channel i to output channel o is
z[o, i] = sum over output positions of (W[o, i] * x_i), which for a Conv is
sum_k W[o, i, k] * S_i[k], S_i[k] being the sum of the zero-padded input under kernel tap k
over all output positions (exact, borders included). Relevance flows with the alpha-beta rule
    r_i = sum_o r_o (alpha z+[o, i] / sum_i' z+[o, i'] - beta z-[o, i] / sum_i' z-[o, i'])
starting from the class's output channel (r = 1). Channels are linked across the graph by the
channel classes of `onnxcut.deps` (residual Adds, Concat, pools, BN...); a class written by
several producers (a residual stream) shares its relevance between them in proportion to each
producer's activation magnitude on that channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcut.graph.io import GraphIndex, attrs

_LAYER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class _Layer:
    name: str
    op: str
    x: str  # input tensor
    weight: np.ndarray
    in_class: np.ndarray  # (C_in,) or (features,) channel class of each input position
    out_class: np.ndarray  # (C_out,)
    attrs: dict
    axis: int = 1  # the channel axis of its input and output (the last for a MatMul)


class Route:
    """Relevance propagation over a model's parameter layers, per image and class."""

    def __init__(self, model, head_score: str, alpha: float = 1.0, beta: float = 0.0):
        from onnxcut.channels.deps import trace

        assert alpha - beta == 1, "the alpha-beta rule conserves relevance only if alpha-beta=1"
        self.alpha, self.beta = alpha, beta
        channels = trace(model)
        index = GraphIndex(model)
        self.layers: list[_Layer] = []
        cls = channels.slot_class
        for node in model.graph.node:
            if node.op_type not in _LAYER_OPS or node.name not in channels.producer_slots:
                continue
            w = index.const(node.input[1])
            cmap = channels.maps.get(node.input[0])
            if w is None or (node.op_type == "MatMul" and w.ndim != 2):
                continue
            a = attrs(node)
            if node.op_type == "Gemm" and a.get("transA", 0):
                continue
            # (out, in, ...) as a Conv's; MatMul and plain Gemm store (in, out).
            weight = w if node.op_type == "Conv" or a.get("transB", 0) else w.T
            axis = len(index.shape(node.input[0]) or [0, 0]) - 1 if node.op_type == "MatMul" else 1
            width = weight.shape[1] * int(a.get("group", 1))  # grouped Conv: all groups' inputs
            in_class = cls[cmap.slots] if cmap is not None else np.full(width, -1)
            self.layers.append(
                _Layer(
                    node.name,
                    node.op_type,
                    node.input[0],
                    weight,
                    in_class,
                    cls[channels.producer_slots[node.name]],
                    a,
                    axis,
                )
            )
        head = index.producer.get(head_score)
        self.head = next(
            (la for la in self.layers if head is not None and la.name == head.name),
            self.layers[-1] if self.layers else None,
        )
        self.inputs = sorted({la.x for la in self.layers})
        self.outputs = {la.name: index.nodes[la.name].output[0] for la in self.layers}
        self.axes = {la.name: la.axis for la in self.layers}

    def run(
        self, values: dict[str, np.ndarray], magnitudes: dict[str, np.ndarray], category: int
    ) -> dict[str, np.ndarray]:
        """Return {layer: (C_out,) relevance of its output channels} for one image.

        `values` holds each layer input (1, C, ...) and `magnitudes` the per-channel activation
        magnitude (C_out,) of each producer, used to split shared residual classes.
        """
        relevance: dict[str, np.ndarray] = {}
        by_class: dict[int, float] = {}
        writers: dict[int, float] = {}  # class -> total magnitude of its producers
        for layer in self.layers:
            mags = magnitudes.get(layer.name)
            if mags is not None:
                for c, m in zip(layer.out_class.tolist(), mags.tolist(), strict=True):
                    writers[c] = writers.get(c, 0.0) + m
        for layer in reversed(self.layers):
            if layer is self.head:
                r_out = np.zeros(len(layer.out_class))
                r_out[category] = 1.0
            else:
                mags = magnitudes.get(layer.name)
                share = (
                    np.array(
                        [
                            m / writers[c] if writers.get(c) else 0.0
                            for c, m in zip(layer.out_class.tolist(), mags.tolist(), strict=True)
                        ]
                    )
                    if mags is not None
                    else np.ones(len(layer.out_class))
                )
                r_out = np.array([by_class.get(c, 0.0) for c in layer.out_class.tolist()]) * share
            relevance[layer.name] = r_out
            z = self._contributions(layer, values[layer.x][0])  # (C_out, C_in)
            r_in = self._alpha_beta(z, r_out)
            for c, r in zip(layer.in_class.tolist(), r_in.tolist(), strict=True):
                if c >= 0:
                    by_class[c] = by_class.get(c, 0.0) + r
        return relevance

    def _alpha_beta(self, z: np.ndarray, r_out: np.ndarray) -> np.ndarray:
        pos, neg = np.maximum(z, 0), np.minimum(z, 0)
        zp = pos.sum(1, keepdims=True)
        zn = neg.sum(1, keepdims=True)
        out = self.alpha * np.divide(pos, zp, out=np.zeros_like(pos), where=zp > 0)
        if self.beta:
            out = out - self.beta * np.divide(neg, zn, out=np.zeros_like(neg), where=zn < 0)
        return r_out @ out

    @staticmethod
    def _contributions(layer: _Layer, x: np.ndarray) -> np.ndarray:
        """z[o, i] summed over output positions, float64."""
        w = layer.weight.astype(np.float64)
        if layer.op == "Gemm":
            return w * x.reshape(-1)[None, :].astype(np.float64)
        if layer.op == "MatMul":  # one weight for every position: sum the inputs first
            return w * x.reshape(-1, x.shape[-1]).sum(0, dtype=np.float64)[None, :]
        taps = _tap_sums(x.astype(np.float64), layer.attrs, w.shape[2:])  # (C_in, kh, kw)
        group = int(layer.attrs.get("group", 1))
        cout, cin_g = w.shape[:2]
        z = np.zeros((cout, cin_g * group))
        per = cout // group
        for g in range(group):
            rows, cols = slice(g * per, (g + 1) * per), slice(g * cin_g, (g + 1) * cin_g)
            z[rows, cols] = np.einsum("oikl,ikl->oi", w[rows], taps[cols])
        return z


def _tap_sums(x: np.ndarray, a: dict, kernel: tuple[int, ...]) -> np.ndarray:
    """S[i, a, b]: sum over output positions of the padded input under kernel tap (a, b)."""
    kh, kw = kernel
    sh, sw = a.get("strides", [1, 1])
    dh, dw = a.get("dilations", [1, 1])
    pads = a.get("pads", [0, 0, 0, 0])
    _, h, w = x.shape
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        out_h, out_w = -(-h // sh), -(-w // sw)
        ph = max((out_h - 1) * sh + (kh - 1) * dh + 1 - h, 0)
        pw = max((out_w - 1) * sw + (kw - 1) * dw + 1 - w, 0)
        lower = a.get("auto_pad") in (b"SAME_LOWER", "SAME_LOWER")
        top, left = (ph - ph // 2, pw - pw // 2) if lower else (ph // 2, pw // 2)
        pads = [top, left, ph - top, pw - left]
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    out_w = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    taps = np.empty((x.shape[0], kh, kw))
    for i in range(kh):
        for j in range(kw):
            window = xp[
                :,
                i * dh : i * dh + (out_h - 1) * sh + 1 : sh,
                j * dw : j * dw + (out_w - 1) * sw + 1 : sw,
            ]
            taps[:, i, j] = window.sum((1, 2))
    return taps
