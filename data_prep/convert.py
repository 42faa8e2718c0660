"""Convert an ImageFolder tree (ImageNet train/ or val/ layout) to FFCV .beton shards + manifest.parquet.

    python -m data_prep.convert --src /data/imagenet/train --out /data/in1k-ffcv/train --shards 8

Shards are contiguous ranges of the sorted ImageFolder samples. Each shard is written to
`shard-NNNNN.beton.partial`, checked, and renamed; a rerun after an interruption keeps the shards
that are complete and rewrites the rest. The manifest is written last, atomically: a directory with
a manifest.parquet is a finished conversion. See data_prep/manifest.py for the format.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from tqdm import tqdm

from data_prep import manifest as M

STATE = ".convert.json"       # written first: the options of the conversion in progress
WRITE_MODES = ("jpg", "raw", "proportion")
PLACEHOLDER = np.zeros((8, 8, 3), np.uint8)


class ConvertError(ValueError):
    """Bad input; the CLI prints it as one line and exits with code 2."""


def default_workers():
    return len(os.sched_getaffinity(0))


def scan(src, limit_per_class=None):
    """Classes and samples exactly as torchvision's ImageFolder lists them; a sample is
    (path, label, id, file size) with id = its index in ImageFolder(src).samples."""
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
    if not classes:
        raise ConvertError(f"--src {src} has no class directories (expected SRC/CLASS/IMAGE.jpg)")
    samples = make_dataset(str(src), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS,
                           allow_empty=True)
    counts = np.bincount([label for _, label in samples], minlength=len(classes))
    if (counts == 0).any():
        empty = classes[int(np.flatnonzero(counts == 0)[0])]
        raise ConvertError(f"class directory {Path(src) / empty} has no images "
                           f"({', '.join(IMG_EXTENSIONS[:3])}, ...)")
    items, taken = [], np.zeros(len(classes), int)
    for sid, (path, label) in enumerate(samples):
        if limit_per_class is None or taken[label] < limit_per_class:
            items.append((path, label, sid, os.path.getsize(path)))
            taken[label] += 1
    return classes, items


def load_rgb(path, max_resolution=None):
    """Decodes to an RGB uint8 array. For JPEGs, lets libjpeg downscale by a power of two while the
    longer side stays >= max_resolution (ffcv then area-resizes to max_resolution exactly)."""
    with Image.open(path) as im:
        w, h = im.size
        if max_resolution and max(w, h) > max_resolution:
            r = max_resolution / max(w, h)
            im.draft("RGB", (int(np.ceil(w * r)), int(np.ceil(h * r))))
        return np.asarray(im.convert("RGB"))


class _Images:
    """What DatasetWriter reads, in its worker processes. An unreadable image becomes a placeholder
    row with id -1 (a worker exception would hang the writer); the reason is collected afterwards."""

    def __init__(self, items, max_resolution):
        self.items, self.max_resolution = items, max_resolution

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label, sid, _ = self.items[i]
        try:
            return load_rgb(path, self.max_resolution), label, sid
        except Exception:
            return PLACEHOLDER, -1, -1


def read_shard_ids(path, expected):
    """The id column of a complete .beton that holds the samples `expected` (ids; -1 where an
    image was skipped), else None: missing, truncated, or another plan's shard."""
    from ffcv.reader import Reader

    n = len(expected)
    try:
        r = Reader(str(path))
        ids = np.asarray(r.metadata[f"f{r.field_names.index(M.ID)}"])
        table = r.alloc_table
        ok = (r.field_names == [M.IMAGE, M.LABEL, M.ID] and r.num_samples == n
              and np.all((ids == expected) | (ids == -1))
              and np.array_equal(np.unique(table["sample_id"]), np.arange(n))
              and int((table["ptr"] + table["size"]).max()) <= int(r.header["alloc_table_ptr"]))
    except Exception:
        return None
    return ids if ok else None


@contextmanager
def _writer_bar(desc, enabled):
    # ffcv's DatasetWriter draws its own bar per shard: name it instead of stacking a second bar.
    import ffcv.writer

    plain = ffcv.writer.tqdm
    ffcv.writer.tqdm = partial(tqdm, desc=desc, unit="img", dynamic_ncols=True, disable=not enabled)
    try:
        yield
    finally:
        ffcv.writer.tqdm = plain


def write_shard(path, items, *, max_resolution, jpeg_quality, write_mode, workers):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        M.IMAGE: RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                               jpeg_quality=jpeg_quality),
        M.LABEL: IntField(),
        M.ID: IntField(),
    }
    # ffcv's smallest page (2 MiB) unless the largest raw image needs more; each writer process
    # fills its own pages, so big pages waste space on small datasets
    page_size = 1 << max(21, (4 * 3 * max_resolution ** 2).bit_length())
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=workers)
    writer.from_indexed_dataset(_Images(items, max_resolution),
                                chunksize=max(1, min(100, len(items) // (4 * workers))))


def _plan(n, shards, shard_size):
    if shard_size:
        shards = -(-n // shard_size)
    shards = min(shards or 1, n)
    return np.array_split(np.arange(n), shards)


def _digest(items, src):
    h = hashlib.sha1()
    for path, label, sid, size in items:
        h.update(f"{os.path.relpath(path, src)}\0{label}\0{sid}\0{size}\n".encode())
    return h.hexdigest()


def _clean(out):
    for p in out.iterdir():
        if p.name in (M.MANIFEST, M.SKIPPED, STATE) or p.name.startswith("shard-"):
            p.unlink()


def _prepare_out(out, options, overwrite):
    """Creates --out, or checks that what is there is this conversion (resume) unless overwrite."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / (STATE + ".probe")
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConvertError(f"cannot write to --out {out}: {e.strerror or e}") from None
    state = out / STATE
    if overwrite:
        _clean(out)
    elif state.exists():
        previous = json.loads(state.read_text())
        if previous != options:
            diff = sorted(k for k in options.keys() | previous.keys()
                          if options.get(k) != previous.get(k))
            raise ConvertError(f"--out {out} holds a conversion with different options "
                               f"({', '.join(diff)}); pass --overwrite to replace it")
    elif any(out.iterdir()):
        raise ConvertError(f"--out {out} is not empty and holds no conversion; "
                           f"pick an empty directory or pass --overwrite")
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(options, sort_keys=True, indent=1))
    os.replace(tmp, state)


def convert(src, out, *, shards=None, shard_size=None, max_resolution=256, jpeg_quality=90,
            write_mode="jpg", workers=None, limit_per_class=None, overwrite=False, progress=True):
    """Converts (or finishes converting) src into out. Returns the summary dict. Raises
    ConvertError for bad input."""
    t0 = time.perf_counter()
    workers = workers or default_workers()
    if shards is not None and shard_size is not None:
        raise ConvertError("give --shards or --shard-size, not both")
    for name, v, lo in [("--shards", shards, 1), ("--shard-size", shard_size, 1),
                        ("--max-resolution", max_resolution, 8), ("--workers", workers, 1),
                        ("--limit-per-class", limit_per_class, 1)]:
        if v is not None and v < lo:
            raise ConvertError(f"{name} must be >= {lo}, got {v}")
    if not 1 <= jpeg_quality <= 100:
        raise ConvertError(f"--jpeg-quality must be in [1, 100], got {jpeg_quality}")
    if write_mode not in WRITE_MODES:
        raise ConvertError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}")
    src, out = Path(src).expanduser().absolute(), Path(out).expanduser().absolute()
    if not src.is_dir():
        raise ConvertError(f"--src {src}: no such directory")

    classes, items = scan(src, limit_per_class)
    plan = _plan(len(items), shards, shard_size)
    options = {
        "format": M.FORMAT, "src": str(src), "max_resolution": max_resolution,
        "jpeg_quality": jpeg_quality, "write_mode": write_mode, "limit_per_class": limit_per_class,
        "shards": len(plan), "samples": len(items), "source_digest": _digest(items, src),
    }
    _prepare_out(out, options, overwrite)

    rows = {k: [] for k in M.SCHEMA.names}
    skipped, kept, written, shard_meta = [], [], [], []
    for i, positions in enumerate(plan):
        shard_items = [items[p] for p in positions]
        expected = np.array([it[2] for it in shard_items])
        final = out / M.shard_name(i)
        ids = read_shard_ids(final, expected) if final.exists() else None
        if ids is not None:
            kept.append(i)
            if progress:
                tqdm.write(f"shard {i + 1}/{len(plan)}: complete, kept")
        else:
            partial_path = final.with_name(final.name + ".partial")
            with _writer_bar(f"shard {i + 1}/{len(plan)}", progress):
                write_shard(partial_path, shard_items, max_resolution=max_resolution,
                            jpeg_quality=jpeg_quality, write_mode=write_mode, workers=workers)
            ids = read_shard_ids(partial_path, expected)
            if ids is None:
                raise RuntimeError(f"{partial_path}: the shard just written does not verify")
            os.replace(partial_path, final)
            written.append(i)
        for j, ((path, label, sid, size), got) in enumerate(zip(shard_items, ids)):
            rel = os.path.relpath(path, src)
            if got == -1:
                skipped.append({"id": sid, "label": label, "path": rel, "reason": _reason(path)})
                continue
            for k, v in zip(M.SCHEMA.names, (sid, i, j, label, classes[label], rel, size)):
                rows[k].append(v)
        shard_meta.append({"file": final.name, "rows": len(shard_items), "samples": int((ids >= 0).sum())})

    M.write_skipped(out, skipped)
    M.write_manifest(out, rows, classes=classes, options=options, shards=shard_meta)
    seconds = time.perf_counter() - t0
    return {
        "out": str(out), "images": len(rows["id"]), "classes": len(classes), "shards": len(plan),
        "kept_shards": kept, "written_shards": written,
        "bytes": sum((out / m["file"]).stat().st_size for m in shard_meta),
        "skipped": [s["path"] for s in skipped], "seconds": seconds,
        "images_per_s": len(rows["id"]) / max(seconds, 1e-9),
    }


def _reason(path):
    try:
        load_rgb(path)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "unreadable during conversion, readable now (rerun with --overwrite)"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    p = _Parser(prog="python -m data_prep.convert",
                description="Convert an ImageFolder tree to FFCV .beton shards and manifest.parquet. "
                            "Run again with the same options to finish an interrupted conversion.")
    p.add_argument("--src", required=True, help="ImageFolder root: SRC/CLASS/IMAGE.{jpg,png,...}")
    p.add_argument("--out", required=True, help="output directory (created)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--shards", type=int, help="number of .beton shards (default 1)")
    g.add_argument("--shard-size", type=int, help="images per shard")
    p.add_argument("--max-resolution", type=int, default=256, help="longer side in pixels (default 256)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--write-mode", choices=WRITE_MODES, default="jpg",
                   help="jpg: re-encode as JPEG; raw: pixels; proportion: half each (default jpg)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="writer processes (default: all cores)")
    p.add_argument("--limit-per-class", type=int, help="keep the first N images of each class")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing conversion in --out instead of resuming it")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        s = convert(args.src, args.out, shards=args.shards, shard_size=args.shard_size,
                    max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                    write_mode=args.write_mode, workers=args.workers,
                    limit_per_class=args.limit_per_class, overwrite=args.overwrite)
    except ConvertError as e:
        print(f"python -m data_prep.convert: error: {e}", file=sys.stderr)
        return 2
    print(f"{s['images']} images, {s['classes']} classes, {s['shards']} shards "
          f"({len(s['kept_shards'])} kept, {len(s['written_shards'])} written), "
          f"{s['bytes'] / 2**20:.1f} MiB, {s['seconds']:.1f} s, {s['images_per_s']:.0f} images/s -> {s['out']}")
    if s["skipped"]:
        print(f"skipped {len(s['skipped'])} unreadable images (listed in {Path(s['out']) / M.SKIPPED}):")
        for path in s["skipped"]:
            print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
