"""The embedded datasets, built offline from what the dependencies ship (nothing is downloaded) and
converted like any other dataset.

    python -m data_prep.demo [--dataset glyphs|cluttered|digits] [--root DIR]

glyphs (the default): the digits 0-9 typeset in the 21 text faces matplotlib ships (DejaVu Sans,
    Sans Mono and Serif, STIX General, each in 4 styles; Computer Modern roman, bold, sans, italic
    and typewriter), as white on black 32x32 scenes of 2 or 3 copies of one digit, each copy in a
    face drawn at random, scaled so its longer side is 25-45% of the image and placed at random
    (apart where there is room) inside the evaluation's center crop. The 16 DejaVu and STIX faces
    make the train split (6400 scenes: 40 per digit and face), the 5 Computer Modern faces, which no
    train scene uses, the val split (1000: 20 per digit and face). Built in ~5 s.
    Why it is hard for raw pixels (kNN top-1 43% at 16px, k=200, against ~67% for scenes of one
    centred-ish copy): copies at random places share few pixels with the copies of another scene,
    and the val faces are new. Why MoCo can learn it: two crops of a scene show copies of the same
    digit, often in different faces, at different places and scales: what the crops vary is what
    the encoder must ignore, and what they share is the digit. Nothing else identifies a scene: no
    colour, texture or noise that two crops of it would share and other scenes would not.
cluttered: scikit-learn's handwritten digits (load_digits: 1797 real 8x8 scans) as
    32x32 scenes: each scan drawn at a random scale (40-85% of the side) and position, in a random
    ink colour on a random background colour, with pixel noise and a faint stroke of another random
    colour across it. The scans are split 80/20 (stratified) before rendering, so no scan is in both
    splits; every train scan is rendered 4 times (5748 images), every val scan twice (720). Every
    colour, position, scale and stroke is drawn per rendering: nothing identifies an image but its
    digit, and what differs between the renderings of one digit is what MoCo's crops, scales and
    colour jitter teach it to ignore. Raw pixels are far from solving it (kNN top-1 30.6% on the
    normalised 16px input, k=200), but so is MoCo: its per-scene colours identify scenes
    (docs/results.md).
digits: the same scans upscaled to 32x32, white on black (1437 train, 360 val): raw-pixel kNN
    scores 92.8%, above every encoder the demo pretrains; kept for quick tests of the machinery.

ROOT/images/{train,val}/CLASS/*.png   the ImageFolder trees
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
DATASETS = ("glyphs", "cluttered", "digits")
DEFAULT = "glyphs"
RENDERINGS = {"train": 4, "val": 2}   # cluttered: scenes drawn per scan of each split
# cluttered: how each scene is drawn (cluttered_images' keywords); part of the cache key
CLUTTER = dict(scale=(0.45, 0.9), noise=0.08, degrees=20, shear=0.3, min_luma=0.3, tint=0.15,
               levels=(0.0, 1.0))


# glyphs: (faces of the train split, of the val split): matplotlib's bundled fonts (mpl-data/fonts/ttf)
FACES = (tuple(f"DejaVu{family}{style}.ttf" for family in ("Sans", "SansMono", "Serif")
               for style in ("", "-Bold", "-Oblique" if family != "Serif" else "-Italic",
                             "-BoldOblique" if family != "Serif" else "-BoldItalic"))
         + ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf"),
         ("cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf"))
SCENES_PER_GLYPH = {"train": 40, "val": 20}
GLYPH_SCALE = (0.25, 0.45)  # a glyph's longer side, as a fraction of the image side
GLYPHS_PER_SCENE = (2, 3)   # copies of the scene's digit


def default_demo_root(dataset=DEFAULT):
    """$MOCO_RAY_DATA/DATASET, or ~/.cache/moco_ray/DATASET; absolute, since Ray workers run elsewhere."""
    base = os.environ.get("MOCO_RAY_DATA") or Path.home() / ".cache" / "moco_ray"
    return (Path(base) / dataset).expanduser().absolute()


def scans():
    """(ink (n, 8, 8) in [0, 1], each scan stretched to the full range; labels (n,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images / 16.0
    return ink / np.maximum(ink.max(axis=(1, 2), keepdims=True), 1e-6), digits.target


def _glyph(ink, side):
    """One 8x8 scan upscaled (bicubic) to side x side, in [0, 1]."""
    return np.asarray(Image.fromarray(ink.astype(np.float32), "F").resize((side, side), Image.BICUBIC)).clip(0, 1)


def digit_images(ink, size):
    """Each scan upscaled to the whole image, white ink on black as scanned. No per-image colour: a
    random tint would identify each instance and MoCo would learn colours instead of shapes."""
    return np.stack([np.repeat((_glyph(x, size) * 255).astype(np.uint8)[..., None], 3, axis=2) for x in ink])


def _tinted_greys(n, rng, tint, levels=(0.0, 1.0)):
    """n random grey levels in `levels`, each channel moved by up to +-tint: colours that the colour
    jitter of MoCo's augmentations (brightness, contrast, saturation, hue, grayscale) can turn into
    each other."""
    return (rng.uniform(*levels, (n, 1)) + rng.uniform(-tint, tint, (n, 3))).clip(0, 1)


def _contrasting(colours, rng, min_luma, tint):
    """A tinted grey per row of `colours` whose luma differs from it by at least min_luma."""
    luma = np.array([0.299, 0.587, 0.114])
    out = _tinted_greys(len(colours), rng, tint)
    bad = np.abs((out - colours) @ luma) < min_luma
    while bad.any():
        out[bad] = _tinted_greys(int(bad.sum()), rng, tint)
        bad = np.abs((out - colours) @ luma) < min_luma
    return out


def _distorted(ink, side, rng, degrees, shear):
    """One scan upscaled to side x side, rotated by up to `degrees` and sheared by up to `shear`
    (a different handwriting of the same digit in every rendering), in [0, 1]."""
    a, s = np.deg2rad(rng.uniform(-degrees, degrees)), rng.uniform(-shear, shear)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, s], [0, 1]])
    c = (side - 1) / 2
    offset = np.array([c, c]) - rot @ np.array([c, c])
    glyph = Image.fromarray(_glyph(ink, side).astype(np.float32), "F")
    coeffs = (*rot[0], offset[0], *rot[1], offset[1])
    return np.asarray(glyph.transform((side, side), Image.AFFINE, coeffs, Image.BILINEAR)).clip(0, 1)


def cluttered_images(ink, size, rng, scale=(0.45, 0.9), noise=0.08, degrees=20, shear=0.3, min_luma=0.3,
                     tint=0.15, levels=(0.0, 1.0)):
    """One scene per scan: the digit, rotated and sheared, at a random side (scale of the image
    side) and position, in a random ink colour on a random background colour (luma at least
    min_luma apart), with Gaussian pixel noise (std `noise`). Everything is drawn per scene, so
    the renderings of one scan share only their digit."""
    n = len(ink)
    sides = rng.integers(round(scale[0] * size), round(scale[1] * size) + 1, n)
    background = _tinted_greys(n, rng, tint, levels)
    colour = _contrasting(background, rng, min_luma, tint)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, side in enumerate(sides):
        alpha = np.zeros((size, size, 1), np.float32)
        x, y = rng.integers(0, size - side + 1, 2)
        alpha[y:y + side, x:x + side, 0] = _distorted(ink[i], side, rng, degrees, shear)
        scene = background[i] * (1 - alpha) + colour[i] * alpha + rng.normal(0, noise, (size, size, 3))
        out[i] = (scene.clip(0, 1) * 255).round().astype(np.uint8)
    return out


def typeset(face, text, points=96):
    """Each character of `text` in the font file `face` of matplotlib's fonts, white on black,
    cropped to its ink: a list of float32 arrays in [0, 1]."""
    import matplotlib
    from PIL import ImageDraw, ImageFont

    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / face), points)
    out = []
    for ch in text:
        canvas = Image.new("L", (2 * points, 2 * points), 0)
        ImageDraw.Draw(canvas).text((points // 4, points // 8), ch, fill=255, font=font)
        ink = np.asarray(canvas, np.float32) / 255
        rows, cols = np.nonzero(ink > 0.08)
        out.append(ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
    return out


def _scaled(glyph, side, rng, scale):
    """The glyph resized so its longer side is a random fraction (in scale) of side, in [0, 1]."""
    h, w = glyph.shape
    f = rng.uniform(*scale) * side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(glyph, "F").resize(size, Image.BILINEAR)).clip(0, 1)


def glyph_scene(glyphs, size, rng, scale=GLYPH_SCALE, tries=20):
    """One white-on-black scene (size, size) uint8 of the given glyphs, each scaled (_scaled) and
    placed at random inside the evaluation's center crop (data_prep.manifest.EVAL_CROP, so evaluation sees every
    glyph whole), apart from the others where `tries` random positions find room."""
    margin = int(np.ceil(size * (1 - M.EVAL_CROP) / 2))
    scene, boxes = np.zeros((size, size), np.float32), []
    for glyph in glyphs:
        ink = _scaled(glyph, size, rng, scale)
        h, w = ink.shape
        for _ in range(tries):
            y, x = (int(rng.integers(margin, size - margin - d + 1)) for d in (h, w))
            if all(y >= b or y + h <= t or x >= r or x + w <= le for t, le, b, r in boxes):
                break
        boxes.append((y, x, y + h, x + w))
        scene[y:y + h, x:x + w] = np.maximum(scene[y:y + h, x:x + w], ink)
    return (scene * 255).round().astype(np.uint8)


def glyph_split(faces, per_face, size, rng):
    """(images (n, size, size, 3) uint8, labels): per_face scenes per digit and face of the split,
    each showing GLYPHS_PER_SCENE copies of its digit, every copy in a face of the split drawn at
    random."""
    faces = [typeset(face, "0123456789") for face in faces]
    images, labels = [], []
    for digit in range(10):
        for _ in range(per_face * len(faces)):
            n = rng.integers(GLYPHS_PER_SCENE[0], GLYPHS_PER_SCENE[1] + 1)
            images.append(glyph_scene([faces[f][digit] for f in rng.integers(0, len(faces), n)], size, rng))
            labels.append(digit)
    return np.repeat(np.stack(images)[..., None], 3, axis=3), np.array(labels)


def split_images(dataset, size, val_fraction, seed):
    """{"train": (images, labels), "val": (images, labels)}: the scans split (stratified) before
    rendering, so that no scan is in both splits; glyphs: split by face (FACES)."""
    from sklearn.model_selection import train_test_split

    if dataset == "glyphs":
        rng = np.random.default_rng(seed)
        return {split: glyph_split(faces, SCENES_PER_GLYPH[split], size, rng)
                for split, faces in zip(("train", "val"), FACES)}
    ink, labels = scans()
    train_ix, val_ix = train_test_split(np.arange(len(labels)), test_size=val_fraction, stratify=labels,
                                        random_state=seed)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, ix in (("train", np.sort(train_ix)), ("val", np.sort(val_ix))):
        if dataset == "digits":
            splits[split] = digit_images(ink[ix], size), labels[ix]
        else:
            ix = np.repeat(ix, RENDERINGS[split])
            splits[split] = cluttered_images(ink[ix], size, rng, **CLUTTER), labels[ix]
    return splits


def _write_tree(root, images, labels, names):
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / names[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:05d}.png")


def build_demo(root=None, dataset=DEFAULT, size=32, val_fraction=0.2, seed=0, workers=1, progress=False):
    """Builds `dataset` (cluttered | digits) under root (default: default_demo_root(dataset)) unless
    it is already there. Returns {"train": Path, "val": Path, "classes": [...]} (absolute converted paths)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown embedded dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    root = Path(root or default_demo_root(dataset)).expanduser().absolute()
    params = {"dataset": dataset, "size": size, "val_fraction": val_fraction, "seed": seed, "format": M.FORMAT,
              "renderings": RENDERINGS if dataset == "cluttered" else None,
              "glyphs": {"faces": FACES, "per_face": SCENES_PER_GLYPH, "scale": GLYPH_SCALE,
                         "copies": GLYPHS_PER_SCENE}
              if dataset == "glyphs" else None,
              "clutter": {k: list(v) if isinstance(v, tuple) else v for k, v in CLUTTER.items()}
              if dataset == "cluttered" else None}
    paths = {"train": root / "train", "val": root / "val"}
    done = root / DONE
    if done.exists() and json.loads(done.read_text()).get("params") == params and all(
            (p / M.MANIFEST).exists() for p in paths.values()):
        return {**paths, "classes": json.loads(done.read_text())["classes"]}

    from data_prep.convert import convert

    names = [str(d) for d in range(10)]
    counts = {}
    for split, (images, labels) in split_images(dataset, size, val_fraction, seed).items():
        tree = root / "images" / split
        if tree.exists():
            for p in sorted(tree.rglob("*.*")):
                p.unlink()
        _write_tree(tree, images, labels, names)
        convert(tree, paths[split], max_resolution=size, jpeg_quality=95, workers=workers,
                overwrite=True, progress=progress)
        counts[split] = len(labels)
    tmp = done.with_name(DONE + ".tmp")
    tmp.write_text(json.dumps({"params": params, "classes": names, **counts}, indent=1))
    os.replace(tmp, done)
    return {**paths, "classes": names}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_prep.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default=DEFAULT, help=f"default: {DEFAULT}")
    p.add_argument("--root", type=Path, default=None, help=f"default: {default_demo_root('DATASET')}")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    args = p.parse_args(argv)
    if args.size < 8:
        print(f"{p.prog}: error: --size must be >= 8, got {args.size}", file=sys.stderr)
        return 2
    from data_prep.convert import ConvertError

    try:
        paths = build_demo(args.root, args.dataset, size=args.size, progress=True)
    except (ConvertError, OSError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    for split in ("train", "val"):
        print(f"{split}: {M.read_metadata(paths[split])['n']} images -> {paths[split]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
