"""Images and label masks from folders, preprocessed into model inputs.

Preprocessing is x = (pixel * scale - mean) / std, per channel, after a resize to `size` and a
BGR->RGB swap when the model wants RGB (OpenCV reads BGR). A model may carry it as JSON in its
`metadata_props` under `onnxcut.preprocess`; flags override single keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto

from onnxcut.errors import DataError
from onnxcut.graph.shapes import dims, graph_inputs

log = logging.getLogger(__name__)

PREPROCESS_KEY = "onnxcut.preprocess"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
IGNORE_LABEL = 255  # label-mask value for "not annotated", as in VOC


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int] | None = None  # (H, W); None keeps the model's input size
    layout: str = "nchw"
    channels: str = "rgb"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if self.layout not in ("nchw", "nhwc"):
            raise DataError(f"preprocess layout '{self.layout}': use nchw or nhwc")
        if self.channels not in ("rgb", "bgr", "gray"):
            raise DataError(f"preprocess channels '{self.channels}': use rgb, bgr or gray")
        want = 1 if self.channels == "gray" else 3
        for key in ("mean", "std"):
            if len(getattr(self, key)) != want:
                raise DataError(
                    f"preprocess {key} has {len(getattr(self, key))} values; "
                    f"{self.channels} images need {want}"
                )
        if any(s == 0 for s in self.std):
            raise DataError("preprocess std has a zero; every std value must be non-zero")

    @property
    def n_channels(self) -> int:
        return 1 if self.channels == "gray" else 3

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["size"] = list(self.size) if self.size else None
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out


def _coerce(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(Preprocess)}
    unknown = set(values) - fields
    if unknown:
        raise DataError(
            f"{source}: unknown preprocess key(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(fields))}"
        )
    out = {}
    try:
        for key, value in values.items():
            if value is None:
                continue
            if key == "size":
                out[key] = tuple(int(v) for v in value)
                assert len(out[key]) == 2
            elif key in ("mean", "std"):
                out[key] = tuple(float(v) for v in value)
            elif key == "scale":
                out[key] = float(value)
            else:
                out[key] = str(value).lower()
    except (TypeError, ValueError, AssertionError):
        raise DataError(f"{source}: preprocess key '{key}' has a bad value {value!r}") from None
    return out


def preprocess_from(
    model: ModelProto | None = None,
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Preprocess:
    """Combine the model's metadata, a JSON file and flag overrides, later ones winning."""
    values: dict[str, Any] = {}
    if model is not None:
        meta = {p.key: p.value for p in model.metadata_props}
        if PREPROCESS_KEY in meta:
            try:
                values.update(_coerce(json.loads(meta[PREPROCESS_KEY]), "model metadata"))
            except json.JSONDecodeError:
                raise DataError(
                    f"model metadata '{PREPROCESS_KEY}' is not JSON; pass --preprocess FILE"
                ) from None
    if file is not None:
        try:
            values.update(_coerce(json.loads(Path(file).read_text()), str(file)))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{file}: cannot read preprocess JSON ({e})") from None
    values.update(_coerce(overrides or {}, "flags"))
    if "layout" not in values and model is not None:
        values["layout"] = _guess_layout(model, values.get("channels", "rgb"))
    return Preprocess(**values)


def _guess_layout(model: ModelProto, channels: str) -> str:
    """nhwc when only the input's last axis has the image's channel count (Keras, TFLite)."""
    inputs = graph_inputs(model)
    shape = dims(inputs[0]) if inputs else None
    n = 1 if channels == "gray" else 3
    if shape and len(shape) == 4 and shape[3] == n and shape[1] != n:
        return "nhwc"
    return "nchw"


def fit_to_model(pre: Preprocess, model: ModelProto) -> Preprocess:
    """Check the preprocessing against the model's image input; fill in the size."""
    inputs = graph_inputs(model)
    shape = dims(inputs[0]) if inputs else None
    if not shape or len(shape) != 4:
        raise DataError(
            f"model input '{inputs[0].name if inputs else '?'}' is not a 4-D image tensor "
            f"({shape}); onnxcut reads images for single-image-input CNNs"
        )
    axes = (1, 2, 3) if pre.layout == "nchw" else (3, 1, 2)
    c, h, w = (shape[a] for a in axes)
    name = inputs[0].name
    if isinstance(c, int) and c > 0 and c != pre.n_channels:
        raise DataError(
            f"input '{name}' has {c} channels in {pre.layout} layout, preprocessing gives "
            f"{pre.n_channels} ({pre.channels}); check --layout and --channels"
        )
    model_size = (h, w) if all(isinstance(x, int) and x > 0 for x in (h, w)) else None
    if pre.size is None and model_size is None:
        raise DataError(f"input '{name}' has a dynamic size; pass --size HxW")
    if pre.size is not None and model_size is not None and tuple(pre.size) != model_size:
        raise DataError(
            f"preprocess size {pre.size[0]}x{pre.size[1]} does not match input '{name}' "
            f"({'x'.join(map(str, shape))}, {pre.layout}); pass --size {h}x{w} or "
            "--input-shape to fix the model's size"
        )
    return dataclasses.replace(pre, size=pre.size or model_size)


def list_images(folder: str | Path) -> list[Path]:
    """Return the images under `folder`, recursively, sorted by path."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder of images; pass --data DIR")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{root}: no images (png, jpg, bmp, tif) found, recursively; check --data")
    return paths


def parse_shard(spec: str | None) -> tuple[int, int]:
    """Parse `K/N` (1 <= K <= N) into (K, N); None means the whole set (1/1)."""
    if not spec:
        return 1, 1
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise DataError(f"--shard '{spec}': expected K/N with 1 <= K <= N, e.g. 2/4")
    return k, n


def shard(paths: Sequence[Path], k: int, n: int) -> list[Path]:
    """Take the deterministic k-th of n interleaved slices of the sorted paths."""
    return list(paths[k - 1 :: n])


def read_image(path: Path, pre: Preprocess) -> np.ndarray | None:
    """Read one image as (H, W, C) uint8 in the model's channel order; None if unreadable."""
    import cv2

    flag = cv2.IMREAD_GRAYSCALE if pre.channels == "gray" else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flag)
    if image is None:
        return None
    if pre.channels == "gray":
        return image[:, :, None]
    return image[:, :, ::-1] if pre.channels == "rgb" else image


def to_input(image: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Resize and normalise one (H, W, C) image into the model's layout, float32."""
    import cv2

    assert pre.size is not None
    h, w = pre.size
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        if image.ndim == 2:
            image = image[:, :, None]
    x = image.astype(np.float32) * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1) if pre.layout == "nchw" else x)


def read_mask(path: Path, shape: tuple[int, int], n_categories: int) -> np.ndarray:
    """Read a label mask of the image's size; check its labels lie in [0, K) or are 255."""
    import cv2

    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DataError(f"{path}: label mask is unreadable; check the file")
    if mask.ndim == 3:
        if not (mask == mask[:, :, :1]).all():
            raise DataError(f"{path}: label mask has colour; save labels as one channel")
        mask = mask[:, :, 0]
    if mask.shape != tuple(shape):
        raise DataError(
            f"{path}: label mask is {mask.shape[0]}x{mask.shape[1]}, its image is "
            f"{shape[0]}x{shape[1]}; masks must match their images pixel for pixel"
        )
    bad = (mask >= n_categories) & (mask != IGNORE_LABEL)
    if bad.any():
        raise DataError(
            f"{path}: label {int(mask[bad].max())} is out of range for {n_categories} "
            f"categories (0..{n_categories - 1}, {IGNORE_LABEL} = ignore)"
        )
    return mask.astype(np.int64)


def mask_path(mask_dir: Path, image: Path, image_root: Path) -> Path | None:
    """Find the label mask with the image's stem, mirroring its sub-folder if there is one."""
    rel = image.relative_to(image_root).with_suffix("")
    for candidate in (mask_dir / rel, mask_dir / rel.name):
        for suffix in (".png", ".bmp", ".tif", ".tiff"):
            path = candidate.with_suffix(suffix)
            if path.is_file():
                return path
    return None


@dataclass
class Batch:
    paths: list[Path]
    inputs: np.ndarray  # (B, C, H, W) or (B, H, W, C), float32
    sizes: list[tuple[int, int]]  # original (H, W) of each image


class Skipped:
    """Warnings for unreadable images, held back until one image has been read, so a folder
    where none can be read ends in its one error line."""

    def __init__(self, hold: bool = True):
        self.held: list[Path] | None = [] if hold else None

    def skip(self, path: Path) -> None:
        if self.held is None:
            log.warning("%s: unreadable or corrupt image, skipped", path)
        else:
            self.held.append(path)

    def read(self) -> None:
        for path in self.held or []:
            log.warning("%s: unreadable or corrupt image, skipped", path)
        self.held = None

    def error(self, total: int) -> DataError:
        first = f" ({self.held[0]} first)" if self.held else ""
        return DataError(f"none of the {total} images could be read{first}; check the files")


def batches(paths: Sequence[Path], pre: Preprocess, batch: int) -> Iterator[Batch]:
    """Yield preprocessed batches; unreadable images are skipped with a warning."""
    skipped = Skipped()
    group: list[tuple[Path, np.ndarray]] = []
    for path in paths:
        image = read_image(path, pre)
        if image is None:
            skipped.skip(path)
            continue
        skipped.read()
        group.append((path, image))
        if len(group) == batch:
            yield _batch(group, pre)
            group = []
    if group:
        yield _batch(group, pre)
    if skipped.held is not None:
        raise skipped.error(len(paths))


def _batch(group: list[tuple[Path, np.ndarray]], pre: Preprocess) -> Batch:
    return Batch(
        paths=[p for p, _ in group],
        inputs=np.stack([to_input(image, pre) for _, image in group]),
        sizes=[image.shape[:2] for _, image in group],
    )


def class_folders(root: str | Path, class_names: Sequence[str] | None = None) -> dict[str, int]:
    """Map ImageFolder sub-folder names to class indices, by name or a class-names list."""
    folders = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    if class_names is not None:
        lookup = {name: i for i, name in enumerate(class_names)}
        missing = [f for f in folders if f not in lookup]
        if missing:
            raise DataError(
                f"{root}: folder(s) {', '.join(missing)} not in --class-names; "
                "name every class folder there"
            )
        return {f: lookup[f] for f in folders}
    if folders and all(f.isdigit() for f in folders):
        return {f: int(f) for f in folders}
    raise DataError(
        f"{root}: class folders {', '.join(folders[:5])}... are not class indices; "
        "pass --class-names FILE (one name a line, in class-index order)"
    )
