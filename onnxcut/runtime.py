"""onnxruntime sessions: the one place that imports onnxruntime.

onnxruntime arrives through an extra (`onnxcut[cpu]` or `onnxcut[gpu]`), so a missing runtime is
a user error that names the extra, not an ImportError.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
from onnx import ModelProto

from onnxcut.errors import ModelError, RuntimeMissingError, first_line

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_FALLBACK = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}


def onnxruntime() -> ModuleType:
    """Import onnxruntime or say which extra installs it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeMissingError(
            "onnxruntime is not installed; install it with pip install 'onnxcut[cpu]' "
            "(or 'onnxcut[gpu]' for CUDA/TensorRT)"
        ) from None
    return ort


def session(
    model: ModelProto | str | os.PathLike[str],
    provider: str = "cpu",
    threads: int | None = None,
    optimize: bool = True,
):
    """Create an InferenceSession for a model proto or path on one provider."""
    ort = onnxruntime()
    if provider not in PROVIDERS:
        raise ModelError(f"provider '{provider}' unknown; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    available = ort.get_available_providers()
    if name not in available:
        raise RuntimeMissingError(
            f"provider '{provider}' ({name}) is not available in this onnxruntime build; "
            "install 'onnxcut[gpu]' on a machine with CUDA, or use --provider cpu"
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Nodes an accelerator's provider does not take fall back along the chain.
    providers = [PROVIDERS[p] for p in _FALLBACK[provider] if PROVIDERS[p] in available]
    if isinstance(model, ModelProto):
        try:
            data = model.SerializeToString()
        except Exception:  # over 2 GB: onnxruntime must read it from disk with external data
            return _session_from_disk(ort, model, opts, providers)
        return _create(ort, data, opts, providers)
    return _create(ort, str(model), opts, providers)


def _create(ort: ModuleType, source, opts, providers):
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"onnxruntime cannot load the model: {first_line(e)}") from None


def _session_from_disk(ort: ModuleType, model: ModelProto, opts, providers):
    from onnxcut.graph.io import save

    with tempfile.TemporaryDirectory(prefix="onnxcut-") as tmp:
        path = save(model, Path(tmp) / "model.onnx")
        return _create(ort, str(path), opts, providers)


def run(
    model: ModelProto | str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    **session_args,
) -> dict[str, np.ndarray]:
    """Run a model once and return its outputs by name."""
    sess = session(model, **session_args)
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))
