"""Helpers for the data tests: ImageFolder trees whose pixels encode each sample's id, and a way to
read a .beton's images back without building an ffcv Loader (which costs a numba compilation)."""
import io

import numpy as np
from PIL import Image

from data_prep import manifest as M

# The red and green channels encode the id (11 levels each, 24 apart: far beyond JPEG error); the
# blue channel is a ramp, so that two crops or flips of the same image differ.
LEVELS = 12 + 24 * np.arange(11)
MAX_ID = len(LEVELS) ** 2


def coloured(sid, h, w):
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = LEVELS[sid % len(LEVELS)]
    img[..., 1] = LEVELS[sid // len(LEVELS)]
    img[..., 2] = np.linspace(0, 255, w)[None, :] * np.linspace(0.3, 1, h)[:, None]
    return img


def id_of(img):
    """img: (3, H, W) values in 0..255 (or (H, W, 3) uint8). The id its red and green encode."""
    img = np.asarray(img, dtype=float)
    if img.shape[0] == 3:
        img = img.transpose(1, 2, 0)
    r, g = (int(np.abs(LEVELS - np.median(img[..., c])).argmin()) for c in (0, 1))
    return r + len(LEVELS) * g


def make_tree(root, counts, *, ext="png", sizes=((20, 24), (24, 20), (18, 18)), first=0):
    """An ImageFolder tree with counts[c] images in class c{c}; the image with ImageFolder index i
    (classes sorted, files sorted) encodes id i. Returns the list of (relative path, label).
    `first`: the id of the first new image, when adding to a tree."""
    assert first + sum(counts) <= MAX_ID
    listed, sid = [], first
    for c, count in enumerate(counts):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for j in range(count):
            h, w = sizes[sid % len(sizes)]
            rel = f"c{c}/{j:03d}.{ext}"
            Image.fromarray(coloured(sid, h, w)).save(root / rel)
            listed.append((rel, c))
            sid += 1
    return listed


def beton_rows(path):
    """(ids, labels, images) of every row of a .beton, decoded with PIL straight from the file."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    meta = r.metadata
    img_f = f"f{r.field_names.index(M.IMAGE)}"
    ids = np.asarray(meta[f"f{r.field_names.index(M.ID)}"])
    labels = np.asarray(meta[f"f{r.field_names.index(M.LABEL)}"])
    size_at = dict(zip(r.alloc_table["ptr"].tolist(), r.alloc_table["size"].tolist()))
    raw = np.memmap(path, np.uint8, mode="r")
    images = []
    for m in meta[img_f]:
        ptr = int(m["data_ptr"])
        data = raw[ptr:ptr + size_at[ptr]]
        if m["mode"] == 0:
            images.append(np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB")))
        else:
            images.append(np.asarray(data).reshape(int(m["height"]), int(m["width"]), 3))
    return ids, labels, images


def unnormalize(x):
    """Normalised float NCHW -> 0..255 floats."""
    import torch

    from moco_ray.augment import MEAN, STD

    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.cpu() * std + mean) * 255
