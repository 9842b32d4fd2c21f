"""Trainer: runs a TrainGraph step by step on plain onnxruntime.

Parameters and optimizer states live in OrtValues on the execution provider's device. Each
step binds them as inputs and lets onnxruntime allocate the updated values on the same
device, which become the next step's inputs, so no weight is copied to the host between
steps; only the loss scalar is read back. (Binding a second, pre-allocated set of buffers as
outputs and swapping them gave wrong optimizer states from the third step on in onnxruntime
1.2x: tests/test_train.py checks a resumed run against an uninterrupted one.) Checkpoints
hold every carried value and the step count, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxcut.errors import ModelError, OutputError, TrainError, first_line
from onnxcut.runtime import onnxruntime, session
from onnxcut.train.graph import LOSS, TrainGraph, updated
from onnxcut.train.nchwc import blocked
from onnxcut.train.optimizers import Optimizer

_DEVICES = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"}


class Trainer:
    """Own one training session and the device buffers of its parameters and states."""

    def __init__(
        self,
        graph: TrainGraph,
        initial: Mapping[str, np.ndarray],
        optimizer: Optimizer,
        *,
        provider: str = "cpu",
        threads: int | None = None,
    ):
        self.graph = graph
        self.optimizer = optimizer
        self.step_count = 0
        # TensorRT cannot build engines for a backward graph; its CUDA fallback runs it.
        model = blocked(graph.model) if provider == "cpu" else graph.model
        self._session = session(model, "cuda" if provider == "tensorrt" else provider, threads)
        self._ort = onnxruntime()
        self._device = _DEVICES[provider]
        self._binding = self._session.io_binding()
        values = {**initial}
        for name in graph.states:
            values[name] = np.zeros(graph.shapes[name], np.asarray(initial[graph.params[0]]).dtype)
        self._live = {n: self._ortvalue(values[n]) for n in graph.carried}

    def _ortvalue(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._device, 0)

    def step(self, feeds: Mapping[str, np.ndarray]) -> float:
        """Run one step on a batch (`feeds`: the image input, target, scales); return the
        loss. A non-finite loss leaves the parameters as they were and raises TrainError."""
        self.step_count += 1
        scalars = self.optimizer.scalars(self.step_count)
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, value in {**feeds, **scalars}.items():
            b.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.float32))
        for name in self.graph.carried:
            b.bind_ortvalue_input(name, self._live[name])
            b.bind_output(updated(name), self._device, 0)
        b.bind_output(LOSS, "cpu")
        try:
            self._session.run_with_iobinding(b)
        except Exception as e:  # onnxruntime's own error types
            self.step_count -= 1
            raise ModelError(
                f"onnxruntime could not run the training step: {first_line(e)}"
            ) from None
        outputs = b.get_outputs()
        loss = float(outputs[-1].numpy())
        if not np.isfinite(loss):
            self.step_count -= 1
            raise TrainError(f"the loss became {loss} at step {self.step_count + 1}")
        self._live = dict(zip(self.graph.carried, outputs[:-1], strict=True))
        return loss

    def parameters(self) -> dict[str, np.ndarray]:
        """Current parameter values, copied to the host."""
        return {n: self._live[n].numpy() for n in self.graph.params}

    def save(self, path: Path, meta: Mapping[str, Any]) -> None:
        """Write a checkpoint atomically: every carried value, the step, and `meta`."""
        arrays = {f"value/{n}": self._live[n].numpy() for n in self.graph.carried}
        info = {**meta, "step": self.step_count}
        arrays["meta"] = np.array(json.dumps(info))
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise OutputError(f"{path}: cannot write the checkpoint ({e.strerror})") from None

    def restore(self, path: Path) -> dict[str, Any]:
        """Load a checkpoint written by `save`; return its meta."""
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                values = {n: f[f"value/{n}"] for n in self.graph.carried if f"value/{n}" in f}
            step = int(meta["step"])
        except (OSError, EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
            raise TrainError(
                f"{path}: not a readable checkpoint ({e}); delete it or drop --resume"
            ) from None
        missing = [n for n in self.graph.carried if n not in values]
        if missing:
            raise TrainError(
                f"{path}: checkpoint lacks '{missing[0]}'; it is from another run, "
                "delete it or drop --resume"
            )
        for n in self.graph.carried:
            self._live[n] = self._ortvalue(values[n])
        self.step_count = step
        return meta
