"""Write a CIFAR-like ImageFolder (32×32 RGB, 10 classes) without downloading anything.

Two kinds, both ``<out>/train/<class>/*.png`` and ``<out>/test/<class>/*.png``:

- ``generated``: ten procedurally drawn patterns (disc, square, triangle, ring, cross, stripes
  in two orientations, checkers, dots, a gradient) in random colours, positions and sizes
  over a noisy textured background;
- ``natural``: random crops (24 px to a third of the image, resized to 32×32, flipped) of ten
  photos that ship inside scikit-image and scikit-learn (astronaut, cat, coffee, Hubble deep
  field, IHC stain, retina, rocket, motorcycle, Chinese temple, flower): the class is the
  photo a crop comes from. Needs ``pip install scikit-image``.

``python train.py data=imagefolder data.data_dir=<out>`` reads either.

Usage:
    python scripts/make_imagefolder.py --kind natural --out data/natural [--train 500 --test 100]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png")
PHOTOS += ("retina.jpg", "rocket.jpg", "motorcycle_left.png")
PATTERNS = ("disc", "square", "triangle", "ring", "cross", "hstripes", "vstripes", "checkers")
PATTERNS += ("dots", "gradient")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(40, 256, 3))


def generated_image(kind: str, rng: np.random.Generator) -> Image.Image:
    """One ``SIZE``×``SIZE`` image of pattern ``kind`` on a textured background."""
    base = rng.integers(0, 120, 3)
    noise = rng.normal(0, 18, (SIZE, SIZE, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    fg = _colour(rng)
    r = int(rng.integers(6, 13))
    cx, cy = (int(v) for v in rng.integers(r, SIZE - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "disc":
        draw.ellipse(box, fill=fg)
    elif kind == "square":
        draw.rectangle(box, fill=fg)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif kind == "ring":
        draw.ellipse(box, outline=fg, width=3)
    elif kind == "cross":
        draw.line((cx - r, cy, cx + r, cy), fill=fg, width=3)
        draw.line((cx, cy - r, cx, cy + r), fill=fg, width=3)
    elif kind in ("hstripes", "vstripes"):
        step = int(rng.integers(4, 7))
        for i in range(0, SIZE, step):
            line = (0, i, SIZE, i) if kind == "hstripes" else (i, 0, i, SIZE)
            draw.line(line, fill=fg, width=2)
    elif kind == "checkers":
        step = int(rng.integers(4, 9))
        for i in range(0, SIZE, step):
            for j in range(0, SIZE, step):
                if (i // step + j // step) % 2 == 0:
                    draw.rectangle((i, j, i + step - 1, j + step - 1), fill=fg)
    elif kind == "dots":
        for _ in range(int(rng.integers(6, 12))):
            x, y = (int(v) for v in rng.integers(2, SIZE - 2, 2))
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=fg)
    else:  # gradient
        ramp = np.linspace(0, 1, SIZE)[None, :, None] * np.array(fg)[None, None, :]
        angle = rng.integers(0, 4)
        ramp = np.rot90(np.broadcast_to(ramp, (SIZE, SIZE, 3)), k=int(angle))
        img = Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))
    return img


def natural_photos() -> list[tuple[str, np.ndarray]]:
    """The ten photos (name, HxWx3 uint8) the ``natural`` kind crops from."""
    try:
        import skimage
        import skimage.io
    except ImportError as err:
        raise SystemExit(
            f"--kind natural crops photos that ship with scikit-image ({err}): "
            "pip install scikit-image, or use --kind generated"
        ) from None
    from sklearn.datasets import load_sample_images

    folder = Path(skimage.__file__).parent / "data"
    photos = [(n.split(".")[0], skimage.io.imread(folder / n)[..., :3]) for n in PHOTOS]
    sample = load_sample_images()
    photos += [("china", sample.images[0]), ("flower", sample.images[1])]
    return photos


def natural_crop(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    h, w = photo.shape[:2]
    s = int(rng.integers(24, min(h, w) // 3))
    y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
    crop = Image.fromarray(photo[y : y + s, x : x + s].astype(np.uint8))
    crop = crop.resize((SIZE, SIZE), Image.BILINEAR)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("generated", "natural"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=500, help="training images per class")
    parser.add_argument("--test", type=int, default=100, help="test images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    photos = natural_photos() if args.kind == "natural" else None
    classes = [n for n, _ in photos] if photos else list(PATTERNS)
    for split, count in (("train", args.train), ("test", args.test)):
        for c, name in enumerate(classes):
            folder = args.out / split / f"{c:02d}_{name}"
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                img = natural_crop(photos[c][1], rng) if photos else generated_image(name, rng)
                img.save(folder / f"{i:04d}.png")
    print(f"{args.kind}: {len(classes)} classes, {args.train}+{args.test} images each → {args.out}")


if __name__ == "__main__":
    main()
