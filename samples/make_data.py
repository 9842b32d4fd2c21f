"""Generate the sample datasets from sklearn's bundled 8x8 digits (no downloads).

digit_scenes/{split}/images/*.png  64x64 RGB scenes with 2-4 digits on a textured background
digit_scenes/{split}/masks/*.png   same stem, uint8 labels: 0 = background, 1..10 = digit 0..9
digits_cls/{split}/<digit>/*.png   32x32 RGB single digits in ImageFolder layout
digit_scenes/unlabeled/*.png, digits_cls/unlabeled/*.png   images only, for label-free
    distillation (`onnxcut distill`): drawn from the train pool with seeds of their own

Train and val draw from disjoint halves of the sklearn digits, so val measures generalisation
to unseen handwriting. Every image has its own seed, so output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from sklearn.datasets import load_digits

SCENE_SIZE = 64
CLS_SIZE = 32
# Val is committed: 160 scenes x (one <8 KiB image + one <4 KiB mask) stays under 2 MB even
# counted in 4 KiB filesystem blocks (du -sh).
NUM_SCENES = {"train": 4000, "val": 160}
CLS_PER_CLASS = {"train": 600, "val": 30}
NUM_UNLABELED = 1000  # per dataset; --count changes it
VAL_FRACTION = 0.35
SPLIT_SEED = 1234
SPLIT_SALT = {"train": 0, "val": 1, "unlabeled": 2}
# Z_FILTERED beats OpenCV's default RLE strategy by ~10% on these noisy images.
PNG_FLAGS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    9,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_FILTERED,
]


def split_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified split of sklearn digits into disjoint train/val pools (images in [0, 1])."""
    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    val_idx, train_idx = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_val = round(len(idx) * VAL_FRACTION)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    pools = {}
    for name, parts in (("train", train_idx), ("val", val_idx)):
        idx = np.sort(np.concatenate(parts))
        pools[name] = (images[idx], labels[idx])
    return pools


def smooth_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour texture: a coarse random grid upsampled, plus a linear gradient."""
    base = rng.uniform(0.15, 0.85, size=3)
    grid = rng.normal(0.0, 0.12, size=(4, 4, 3)).astype(np.float32)
    tex = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    bg = base[None, None, :] + tex + 0.08 * grad[:, :, None]
    return np.clip(bg, 0.0, 1.0).astype(np.float32)


def contrasting_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """Random RGB colour whose luminance differs clearly from the background's."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    bg_lum = float(bg_mean @ weights)
    for _ in range(100):
        colour = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        if abs(float(colour @ weights) - bg_lum) > 0.3:
            return colour
    return np.full(3, 0.0 if bg_lum > 0.5 else 1.0, dtype=np.float32)


def digit_alpha(digit: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upscale an 8x8 digit to a soft alpha matte in [0, 1]."""
    alpha = cv2.resize(digit, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(alpha, 0.0, 1.0)


def add_noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    # Mild noise: strong per-pixel noise would make the committed PNGs incompressible.
    noisy = img * 255.0 + rng.normal(0.0, sigma, size=img.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def overlaps_too_much(box: tuple[int, int, int, int], boxes: list) -> bool:
    """Allow slight overlap only: at most 15% of the smaller box."""
    y, x, h, w = box
    for by, bx, bh, bw in boxes:
        iy = max(0, min(y + h, by + bh) - max(y, by))
        ix = max(0, min(x + w, bx + bw) - max(x, bx))
        if iy * ix > 0.15 * min(h * w, bh * bw):
            return True
    return False


def make_scene(
    rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One RGB scene (uint8, HxWx3) and its label mask (uint8, HxW)."""
    size = SCENE_SIZE
    img = smooth_background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(2, 5))):
        for _attempt in range(30):
            h = int(rng.integers(20, 29))
            w = round(h * rng.uniform(0.75, 1.0))
            box = (int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w)
            if not overlaps_too_much(box, boxes):
                break
        else:
            continue
        boxes.append(box)
        k = int(rng.integers(len(digits)))
        y, x, h, w = box
        alpha = digit_alpha(digits[k], h, w)[:, :, None]
        region = img[y : y + h, x : x + w]
        colour = contrasting_colour(rng, region.reshape(-1, 3).mean(axis=0))
        img[y : y + h, x : x + w] = region * (1.0 - alpha) + colour * alpha
        # Later digits win where they overlap earlier ones.
        mask[y : y + h, x : x + w][alpha[:, :, 0] > 0.5] = labels[k] + 1
    return add_noise(rng, img, sigma=2.0), mask


def make_cls_image(rng: np.random.Generator, digit: np.ndarray) -> np.ndarray:
    """One 32x32 RGB digit with random scale, shift, colours and noise."""
    size = CLS_SIZE
    img = smooth_background(rng, size)
    h = int(rng.integers(20, 27))
    w = round(h * rng.uniform(0.75, 1.0))
    y = int(rng.integers(0, size - h + 1))
    x = int(rng.integers(0, size - w + 1))
    alpha = digit_alpha(digit, h, w)[:, :, None]
    region = img[y : y + h, x : x + w]
    colour = contrasting_colour(rng, region.reshape(-1, 3).mean(axis=0))
    img[y : y + h, x : x + w] = region * (1.0 - alpha) + colour * alpha
    return add_noise(rng, img, sigma=3.0)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), PNG_FLAGS)


def write_scenes(out: Path, split: str, digits: np.ndarray, labels: np.ndarray) -> None:
    img_dir = out / "digit_scenes" / split / "images"
    mask_dir = out / "digit_scenes" / split / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i in range(NUM_SCENES[split]):
        rng = np.random.default_rng([SPLIT_SALT[split], 1, i])
        img, mask = make_scene(rng, digits, labels)
        write_rgb(img_dir / f"{i:05d}.png", img)
        cv2.imwrite(str(mask_dir / f"{i:05d}.png"), mask, PNG_FLAGS)


def write_cls(out: Path, split: str, digits: np.ndarray, labels: np.ndarray) -> None:
    for cls in range(10):
        cls_dir = out / "digits_cls" / split / str(cls)
        cls_dir.mkdir(parents=True, exist_ok=True)
        pool = digits[labels == cls]
        for i in range(CLS_PER_CLASS[split]):
            rng = np.random.default_rng([SPLIT_SALT[split], 2, cls, i])
            # Walk the pool in order so every source digit gets used before any repeats.
            img = make_cls_image(rng, pool[i % len(pool)])
            write_rgb(cls_dir / f"{i:05d}.png", img)


def write_unlabeled(out: Path, digits: np.ndarray, labels: np.ndarray, count: int) -> None:
    """Scenes and single digits without masks or class folders, from the train pool."""
    salt = SPLIT_SALT["unlabeled"]
    scenes = out / "digit_scenes" / "unlabeled"
    singles = out / "digits_cls" / "unlabeled"
    scenes.mkdir(parents=True, exist_ok=True)
    singles.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, _ = make_scene(np.random.default_rng([salt, 1, i]), digits, labels)
        write_rgb(scenes / f"{i:05d}.png", img)
        rng = np.random.default_rng([salt, 2, i])
        write_rgb(singles / f"{i:05d}.png", make_cls_image(rng, digits[i % len(digits)]))


def generate(out: Path, splits: list[str], count: int = NUM_UNLABELED) -> None:
    pools = split_digits()
    for split in splits:
        if split == "unlabeled":
            print(f"[make_data] unlabeled: {count} scenes and {count} digits -> {out}")
            write_unlabeled(out, *pools["train"], count)
            continue
        if split not in pools:
            raise SystemExit(f"unknown split {split!r}; expected train, val and/or unlabeled")
        digits, labels = pools[split]
        print(f"[make_data] {split}: {len(digits)} source digits -> {out}")
        write_scenes(out, split, digits, labels)
        write_cls(out, split, digits, labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    parser.add_argument(
        "--splits", default="train,val", help="comma-separated: train,val,unlabeled"
    )
    parser.add_argument(
        "--count", type=int, default=NUM_UNLABELED, help="images per unlabeled dataset"
    )
    args = parser.parse_args(argv)
    generate(args.out, [s for s in args.splits.split(",") if s], args.count)


if __name__ == "__main__":
    main()
