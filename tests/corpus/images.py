"""Tiny image folders for attribute, eval and distill: PNGs written with OpenCV."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SIZE = 24  # not the models' 16, so every run resizes


def _image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Noise with a bright rectangle: (H, W, 3) uint8."""
    image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    y, x = rng.integers(0, size // 2, 2)
    image[y : y + size // 2, x : x + size // 2] = rng.integers(150, 256, 3, dtype=np.uint8)
    return image


def write_images(folder: Path, n: int, seed: int = 0, size: int = IMAGE_SIZE) -> Path:
    """Write n images 00000.png... into folder; return it."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:05d}.png"), _image(rng, size))
    return folder


def write_masks(images: Path, masks: Path, categories: int, seed: int = 0) -> Path:
    """Write a label mask (blocks of labels 0..K-1, some 255) for each image in `images`."""
    import cv2

    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for path in sorted(images.glob("*.png")):
        h, w = cv2.imread(str(path)).shape[:2]
        coarse = rng.integers(0, categories, (4, 4)).astype(np.uint8)
        coarse[0, 0] = 255  # one block not annotated
        label = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(masks / f"{path.stem}.png"), label)
    return masks


def write_class_folders(root: Path, categories: int, per_class: int = 1, seed: int = 0) -> Path:
    """An ImageFolder: sub-folders named 0..K-1 with `per_class` images each."""
    for k in range(categories):
        write_images(root / str(k), per_class, seed=seed * 100 + k)
    return root
