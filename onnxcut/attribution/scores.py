"""The scores file: per-layer, per-category channel accumulators in an .npz without pickle.

Keys (every array float64 unless said):
    forward/<layer>    (K, C) sum over images of each image's forward probability vector
    backward/<layer>   (K, C) sum over images of each image's backward coefficient vector
    taylor/<layer>     (K, C) sum over images of |sum_M F dS/dF| per channel, normalised
    count              (K,) images that contributed to each category
    categories         (K,) category names, strings
    meta               0-d string: JSON with model_sha256, task, tau, objective, preprocess,
                       grad backend, layers, lrp (classify), images seen, shards, version

`<layer>` is the producer node name that the plan format uses. Sums, not means, so shards
merge exactly by addition.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxcut.errors import DataError

FORMAT = "onnxcut.scores/1"
KINDS = ("forward", "backward", "taylor", "relevance")
# Settings that must agree for files to be merged; images and shards add up instead.
MERGE_KEYS = (
    "format",
    "model_sha256",
    "task",
    "tau",
    "objective",
    "preprocess",
    "grad",
    "output",
    "category_axis",
    "probs",
    "layers",
    "lrp",
    "top_k",
    "labels",
)


@dataclass
class Scores:
    categories: list[str]
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # "forward/<layer>" -> (K, C)
    count: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,)

    @classmethod
    def empty(
        cls,
        categories: list[str],
        layers: Mapping[str, int],
        kinds: Iterable[str],
        meta: dict[str, Any],
    ) -> Scores:
        k = len(categories)
        arrays = {
            f"{kind}/{name}": np.zeros((k, c)) for kind in kinds for name, c in layers.items()
        }
        meta = {"format": FORMAT, **meta}
        return cls(list(categories), meta, arrays, np.zeros(k))

    def layers(self, kind: str = "forward") -> list[str]:
        prefix = f"{kind}/"
        return [key[len(prefix) :] for key in self.arrays if key.startswith(prefix)]

    def get(self, kind: str, layer: str) -> np.ndarray:
        return self.arrays[f"{kind}/{layer}"]

    def mean(self, kind: str, layer: str) -> np.ndarray:
        """Per-category mean vectors (K, C); categories never seen give zeros."""
        return self.get(kind, layer) / np.maximum(self.count, 1)[:, None]


def save_scores(scores: Scores, path: str | os.PathLike[str]) -> Path:
    """Write the .npz atomically (temporary file beside it, then rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise DataError(f"{path}: folder '{path.parent}' does not exist; create it first")
    payload = {
        **scores.arrays,
        "count": scores.count,
        "categories": np.array(scores.categories, dtype=np.str_),
        "meta": np.array(json.dumps(scores.meta, sort_keys=True), dtype=np.str_),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_scores(path: str | os.PathLike[str], model_sha256: str | None = None) -> Scores:
    """Read a scores file; with `model_sha256`, refuse one made from another model."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            content = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such scores file; make one with onnxcut attribute") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable scores .npz ({e}); re-run attribute") from None
    try:
        meta = json.loads(str(content.pop("meta")))
        categories = [str(c) for c in content.pop("categories")]
        count = content.pop("count").astype(np.float64)
    except (KeyError, TypeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise DataError(
            f"{path}: not an onnxcut scores file (meta, categories or count "
            "missing or unreadable); re-run attribute"
        )
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT}")
    k = len(categories)
    for key, array in content.items():
        kind, _, layer = key.partition("/")
        shaped = array.ndim == 2 and array.shape[0] == k and array.dtype.kind in "fiu"
        if kind not in KINDS or not layer or not shaped:
            raise DataError(f"{path}: array '{key}' is not (K={k}, C); the file is corrupt")
        if not np.isfinite(array).all():
            raise DataError(f"{path}: array '{key}' holds NaN or infinite values; re-run attribute")
    if count.shape != (k,) or not np.isfinite(count).all():
        raise DataError(f"{path}: 'count' is not {k} finite image counts; the file is corrupt")
    if model_sha256 is not None and meta.get("model_sha256") != model_sha256:
        raise DataError(
            f"{path}: scores belong to another model (sha256 {str(meta.get('model_sha256'))[:12]}"
            f"…, this model {model_sha256[:12]}…); re-run attribute on this model"
        )
    return Scores(categories, meta, content, count)


def merge(sources: Iterable[str | os.PathLike[str] | Scores]) -> Scores:
    """Add up shards of one run; files from different models or settings are refused."""
    items = [
        (f"scores #{i + 1}", s) if isinstance(s, Scores) else (str(s), load_scores(s))
        for i, s in enumerate(sources)
    ]
    if not items:
        raise DataError("merge needs at least one scores file")
    _, first = items[0]
    for label, other in items[1:]:
        for key in MERGE_KEYS:
            if first.meta.get(key) != other.meta.get(key):
                raise DataError(
                    f"{label}: '{key}' differs from the first file's "
                    f"({other.meta.get(key)!r} vs {first.meta.get(key)!r}); "
                    "only shards of one run merge"
                )
        if other.categories != first.categories or set(other.arrays) != set(first.arrays):
            raise DataError(f"{label}: categories or layers differ; only shards of one run merge")
        shape = next(
            (k for k in first.arrays if other.arrays[k].shape != first.arrays[k].shape), None
        )
        if shape is not None:
            raise DataError(
                f"{label}: array '{shape}' is {other.arrays[shape].shape}, in the first file "
                f"{first.arrays[shape].shape}; only shards of one run merge"
            )
    shards = [s.meta.get("shard") for _, s in items]
    if None not in shards and len(set(shards)) != len(shards):
        raise DataError(f"shard {shards[0]} given twice; merge each shard once")
    # Per-image vectors are quantised (quantize()), so these float sums are exact in any order.
    arrays = {key: sum(s.arrays[key] for _, s in items) for key in first.arrays}
    meta = dict(first.meta)
    for key in ("images", "skipped"):
        meta[key] = sum(int(s.meta.get(key, 0)) for _, s in items)
    meta["shard"] = None
    meta["merged_shards"] = sorted(str(s) for s in shards if s is not None)
    meta.pop("done", None)
    return Scores(first.categories, meta, arrays, sum(s.count for _, s in items))


QUANTUM = 2.0**-32


def quantize(vectors: np.ndarray) -> np.ndarray:
    """Round per-image vectors (entries in [0, 1]) to multiples of 2**-32.

    Sums of such values stay exact in float64 up to 2**21 images, so shards, resumed runs and
    single runs give bit-identical accumulators whatever the order of addition.
    """
    return np.round(np.asarray(vectors, np.float64) / QUANTUM) * QUANTUM
