"""Image folders, preprocessing and label masks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from onnxcut.data import (
    PREPROCESS_KEY,
    Preprocess,
    batches,
    class_folders,
    fit_to_model,
    list_images,
    mask_path,
    parse_shard,
    preprocess_from,
    read_mask,
    shard,
    to_input,
)
from onnxcut.errors import DataError

from conftest import conv_bn_net
from netbuilder import NetBuilder


def _write_images(folder: Path, n: int, size=(20, 24)) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:03d}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        paths.append(path)
    return sorted(paths)


def _with_meta(model: onnx.ModelProto, **values) -> onnx.ModelProto:
    onnx.helper.set_model_props(model, {PREPROCESS_KEY: json.dumps(values)})
    return model


def test_metadata_is_default_and_flags_override(tmp_path: Path):
    model = _with_meta(
        conv_bn_net(),
        size=[16, 16],
        layout="nchw",
        channels="rgb",
        scale=1 / 255,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
    )
    pre = preprocess_from(model)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.size == (16, 16)
    file = tmp_path / "p.json"
    file.write_text(json.dumps({"channels": "bgr"}))
    pre = preprocess_from(model, file, {"std": [1, 2, 3]})
    assert (pre.channels, pre.std, pre.mean) == ("bgr", (1.0, 2.0, 3.0), (0.5, 0.5, 0.5))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"colour": "rgb"}, "unknown preprocess key"),
        ({"mean": [0, 0]}, "mean has 2 values"),
        ({"layout": "chw"}, "use nchw or nhwc"),
        ({"std": [1, 0, 1]}, "zero"),
        ({"size": [1, 2, 3]}, "'size' has a bad value"),
    ],
)
def test_bad_preprocess(overrides, message):
    with pytest.raises(DataError, match=message):
        preprocess_from(None, None, overrides)


def test_fit_to_model():
    model = conv_bn_net()  # input 1x3x16x16
    assert fit_to_model(Preprocess(), model).size == (16, 16)
    with pytest.raises(DataError, match=r"size 32x32 does not match input 'input'.*--size 16x16"):
        fit_to_model(Preprocess(size=(32, 32)), model)
    with pytest.raises(DataError, match="has 16 channels in nhwc layout"):
        fit_to_model(Preprocess(layout="nhwc"), model)


def test_layout_is_guessed_from_the_input_shape():
    """Keras and TFLite exports take (N, H, W, C) images; nobody should have to say so."""
    nhwc = NetBuilder((1, 3, 16, 16), layout="nhwc").build([])  # input 1x16x16x3
    assert preprocess_from(nhwc).layout == "nhwc"
    assert fit_to_model(preprocess_from(nhwc), nhwc).size == (16, 16)
    assert preprocess_from(conv_bn_net()).layout == "nchw"
    gray = NetBuilder((1, 1, 8, 8), layout="nhwc").build([])
    gray_flags = {"channels": "gray", "mean": [0.0], "std": [1.0]}
    assert preprocess_from(gray, overrides=gray_flags).layout == "nhwc"
    # Said explicitly, the layout is kept, and a mismatch is the usual one-line error.
    said = preprocess_from(nhwc, overrides={"layout": "nchw"})
    with pytest.raises(DataError, match="has 16 channels in nchw layout"):
        fit_to_model(said, nhwc)


def test_to_input_formula():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    pre = Preprocess(size=(2, 3), scale=0.5, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0))
    x = to_input(image, pre)
    expected = (image * 0.5 - np.array([1, 2, 3])) / np.array([2, 4, 8])
    np.testing.assert_allclose(x, expected.transpose(2, 0, 1), rtol=1e-6)
    nhwc = to_input(image, Preprocess(size=(4, 6), layout="nhwc"))
    assert nhwc.shape == (4, 6, 3) and nhwc.dtype == np.float32


def test_rgb_swaps_opencv_bgr(tmp_path: Path):
    path = tmp_path / "red.png"
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 2] = 255  # red in OpenCV's BGR
    cv2.imwrite(str(path), image)
    (rgb,) = next(batches([path], Preprocess(size=(4, 4)), 1)).inputs
    (bgr,) = next(batches([path], Preprocess(size=(4, 4), channels="bgr"), 1)).inputs
    assert rgb[0].min() == 1.0 and rgb[2].max() == 0.0
    assert bgr[2].min() == 1.0 and bgr[0].max() == 0.0


def test_list_images_recursive_and_sorted(tmp_path: Path):
    paths = _write_images(tmp_path, 5)
    (tmp_path / "notes.txt").write_text("not an image")
    assert list_images(tmp_path) == paths


def test_empty_folder(tmp_path: Path):
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        list_images(tmp_path / "missing")


def test_shards_partition_the_images(tmp_path: Path):
    paths = _write_images(tmp_path, 7)
    parts = [shard(paths, k, 3) for k in (1, 2, 3)]
    assert sorted(p for part in parts for p in part) == paths
    assert sum(map(len, parts)) == 7
    assert parse_shard("2/3") == (2, 3) and parse_shard(None) == (1, 1)
    for bad in ("0/3", "4/3", "x", "1/"):
        with pytest.raises(DataError, match="--shard"):
            parse_shard(bad)


def test_corrupt_images_are_skipped(tmp_path: Path, caplog):
    paths = _write_images(tmp_path, 3)
    paths[1].write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        got = list(batches(paths, Preprocess(size=(8, 8)), 2))
    assert [p for b in got for p in b.paths] == [paths[0], paths[2]]
    assert got[0].inputs.shape == (2, 3, 8, 8) and got[0].sizes == [(20, 24), (20, 24)]
    assert "unreadable or corrupt image" in caplog.text
    for p in paths:
        p.write_bytes(b"")
    with pytest.raises(DataError, match="none of the 3 images could be read"):
        list(batches(paths, Preprocess(size=(8, 8)), 2))


def test_label_masks(tmp_path: Path):
    mask = np.zeros((5, 6), np.uint8)
    mask[1, 1], mask[2, 2] = 3, 255
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), mask)
    np.testing.assert_array_equal(read_mask(path, (5, 6), 4), mask)
    with pytest.raises(DataError, match="label mask is 5x6, its image is 6x6"):
        read_mask(path, (6, 6), 4)
    with pytest.raises(DataError, match="label 3 is out of range for 3 categories"):
        read_mask(path, (5, 6), 3)


def test_mask_path_finds_same_stem(tmp_path: Path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "sub").mkdir(parents=True)
    masks.mkdir()
    (masks / "x.png").write_bytes(b"")
    assert mask_path(masks, images / "sub" / "x.jpg", images) == masks / "x.png"
    assert mask_path(masks, images / "y.jpg", images) is None


def test_class_folders(tmp_path: Path):
    for name in ("0", "1", "10"):
        (tmp_path / name).mkdir()
    assert class_folders(tmp_path) == {"0": 0, "1": 1, "10": 10}
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="--class-names"):
        class_folders(tmp_path)
    names = ["0", "1", "cat", "x", "10"]
    assert class_folders(tmp_path, names) == {"0": 0, "1": 1, "10": 4, "cat": 2}
