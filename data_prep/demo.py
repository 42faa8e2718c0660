"""The embedded default dataset: scikit-learn's handwritten digits (load_digits, 1797 real 8x8
scans, shipped with the package; nothing is downloaded) as small RGB JPEGs, converted like any
other dataset.

    python -m data_prep.demo [--root DIR]

ROOT/images/{train,val}/CLASS/*.jpg   the ImageFolder trees (stratified held-out split)
ROOT/train/                           converted: pretraining, and the labelled kNN memory bank
ROOT/val/                             converted: the labelled kNN queries
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import manifest as M

DONE = "demo.json"


def default_demo_root():
    """$MOCO_RAY_DATA, or ~/.cache/moco_ray/digits; absolute, since Ray workers run elsewhere."""
    return Path(os.environ.get("MOCO_RAY_DATA") or Path.home() / ".cache" / "moco_ray" / "digits").expanduser().absolute()


def digit_images(size, seed):
    """(images uint8 (n, size, size, 3), labels): each 8x8 scan upscaled, its ink contrast
    stretched to the full range, white ink on black as scanned. No per-image colour: a random tint
    would identify each instance and MoCo would learn colours instead of shapes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images / 16.0                                               # (n, 8, 8) in [0, 1]
    ink = ink / np.maximum(ink.max(axis=(1, 2), keepdims=True), 1e-6)
    images = []
    for x in ink:
        big = np.asarray(Image.fromarray((x * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
        images.append(np.repeat(big[..., None], 3, axis=2))
    return np.stack(images), digits.target


def _write_tree(root, images, labels, names):
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / names[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=95)


def build_demo(root=None, size=32, val_fraction=0.2, seed=0, workers=1, progress=False):
    """Builds the digits dataset under root (default: default_demo_root()) unless it is already
    there. Returns {"train": Path, "val": Path, "classes": [...]} (absolute converted paths)."""
    root = Path(root or default_demo_root()).expanduser().absolute()
    params = {"size": size, "val_fraction": val_fraction, "seed": seed, "format": M.FORMAT, "ink": "grey"}
    paths = {"train": root / "train", "val": root / "val"}
    done = root / DONE
    if done.exists() and json.loads(done.read_text()).get("params") == params and all(
            (p / M.MANIFEST).exists() for p in paths.values()):
        return {**paths, "classes": json.loads(done.read_text())["classes"]}

    from sklearn.model_selection import train_test_split

    from data_prep.convert import convert

    images, labels = digit_images(size, seed)
    names = [str(d) for d in range(10)]
    index = np.arange(len(labels))
    train_ix, val_ix = train_test_split(index, test_size=val_fraction, stratify=labels, random_state=seed)
    for split, ix in (("train", np.sort(train_ix)), ("val", np.sort(val_ix))):
        tree = root / "images" / split
        if tree.exists():
            for p in sorted(tree.rglob("*.jpg")):
                p.unlink()
        _write_tree(tree, images[ix], labels[ix], names)
        convert(tree, paths[split], max_resolution=size, jpeg_quality=95, workers=workers,
                overwrite=True, progress=progress)
    tmp = done.with_name(DONE + ".tmp")
    tmp.write_text(json.dumps({"params": params, "classes": names,
                               "train": len(train_ix), "val": len(val_ix)}, indent=1))
    os.replace(tmp, done)
    return {**paths, "classes": names}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_prep.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=None, help=f"default: {default_demo_root()}")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    args = p.parse_args(argv)
    if args.size < 8:
        print(f"{p.prog}: error: --size must be >= 8, got {args.size}", file=sys.stderr)
        return 2
    from data_prep.convert import ConvertError

    try:
        paths = build_demo(args.root, size=args.size, progress=True)
    except (ConvertError, OSError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    for split in ("train", "val"):
        print(f"{split}: {M.read_metadata(paths[split])['n']} images -> {paths[split]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
