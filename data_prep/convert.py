"""Convert an ImageFolder tree (ImageNet train/ or val/ layout) to FFCV .beton shards + manifest.parquet.

    python -m data_prep.convert --src /data/imagenet/train --out /data/in1k-ffcv/train --shards 8
    python -m data_prep.convert ... --shards 16 --address auto --cpus-per-shard 8   # on a Ray cluster

Shards are contiguous ranges of the sorted ImageFolder samples. Each shard is written to
`shard-NNNNN.beton.partial`, checked, and renamed; a rerun after an interruption keeps the shards
that are complete and rewrites the rest. The manifest is written last, atomically: a directory with
a manifest.parquet is a finished conversion. See data_prep/manifest.py for the format.

Where the work runs. The source tree is listed once, here (one stat per image). Without a Ray
address (--address, or $RAY_ADDRESS as under `ray job submit`) the shards are written one after
another in this process with --workers writer processes: no Ray start-up for small trees such as
the demo's. With an address, every shard still to write is one Ray task that needs
--cpus-per-shard CPUs and writes with that many processes, on whichever node has room; the task
gets only its shard's list. Ray retries a failed task once; a shard that fails twice fails the
conversion once the other shards are done. Both ways write the same shards, manifest and skipped
list: a shard's content depends only on its list of images and the options.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
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


class _Forward:
    """Stands in for the tqdm bar that ffcv's DatasetWriter draws for a shard: passes its updates
    (images written) on to `report`."""

    def __init__(self, report):
        self.report = report

    def __call__(self, *args, **kwargs):
        return self

    def update(self, n):
        self.report(n)

    def close(self):
        pass


@contextmanager
def _writer_progress(report):
    import ffcv.writer

    plain = ffcv.writer.tqdm
    ffcv.writer.tqdm = _Forward(report)
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


def _check_args(shards, shard_size, max_resolution, jpeg_quality, write_mode, workers,
                limit_per_class, cpus_per_shard):
    if shards is not None and shard_size is not None:
        raise ConvertError("give --shards or --shard-size, not both")
    for name, v, lo in [("--shards", shards, 1), ("--shard-size", shard_size, 1),
                        ("--max-resolution", max_resolution, 8), ("--workers", workers, 1),
                        ("--limit-per-class", limit_per_class, 1),
                        ("--cpus-per-shard", cpus_per_shard, 1)]:
        if v is not None and v < lo:
            raise ConvertError(f"{name} must be >= {lo}, got {v}")
    if not 1 <= jpeg_quality <= 100:
        raise ConvertError(f"--jpeg-quality must be in [1, 100], got {jpeg_quality}")
    if write_mode not in WRITE_MODES:
        raise ConvertError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}")


def convert(src, out, *, shards=None, shard_size=None, max_resolution=256, jpeg_quality=90,
            write_mode="jpg", workers=None, limit_per_class=None, overwrite=False, progress=True,
            address=None, cpus_per_shard=1):
    """Converts (or finishes converting) src into out. Returns the summary dict. Raises
    ConvertError for bad input, ShardError when a shard cannot be written. address: a Ray
    cluster ('auto', host:port) to write the shards as Ray tasks of cpus_per_shard CPUs each; None:
    in this process with `workers` writer processes (the CLI passes $RAY_ADDRESS when set)."""
    t0 = time.perf_counter()
    if address and workers:
        raise ConvertError("--workers is for converting in this process; on Ray, each shard's task "
                           "writes with --cpus-per-shard processes")
    workers = workers or default_workers()
    _check_args(shards, shard_size, max_resolution, jpeg_quality, write_mode, workers,
                limit_per_class, cpus_per_shard)
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

    lists = [[items[p] for p in positions] for positions in plan]
    ids = {i: _complete_shard(out, i, lists[i]) for i in range(len(plan))}
    kept = [i for i, got in ids.items() if got is not None]
    todo = {i: lists[i] for i in range(len(plan)) if i not in kept}
    style = dict(max_resolution=max_resolution, jpeg_quality=jpeg_quality, write_mode=write_mode)
    if todo:   # no longer a finished conversion until the manifest is written again
        (out / M.MANIFEST).unlink(missing_ok=True)
    with tqdm(total=sum(map(len, todo.values())), unit="img", dynamic_ncols=True,
              desc=f"convert ({len(kept)}/{len(plan)} shards kept)", disable=not progress) as bar:
        if address and todo:
            ids.update(_write_on_ray(out, todo, style, address, cpus_per_shard, bar))
        else:
            for i, shard_items in todo.items():
                ids[i] = write_verified_shard(out, i, shard_items, style, workers, bar.update)
    rows, skipped, shard_meta = _tables(src, out, classes, lists, ids)
    M.write_skipped(out, skipped)
    M.write_manifest(out, rows, classes=classes, options=options, shards=shard_meta)
    seconds = time.perf_counter() - t0
    return {
        "out": str(out), "images": len(rows["id"]), "classes": len(classes), "shards": len(plan),
        "kept_shards": kept, "written_shards": sorted(todo),
        "bytes": sum((out / m["file"]).stat().st_size for m in shard_meta),
        "skipped": [s["path"] for s in skipped], "seconds": seconds,
        "images_per_s": len(rows["id"]) / max(seconds, 1e-9),
    }


def _expected_ids(shard_items):
    return np.array([it[2] for it in shard_items])


def _complete_shard(out, i, shard_items):
    """The ids of shard i if it is already written and complete, else None."""
    final = out / M.shard_name(i)
    return read_shard_ids(final, _expected_ids(shard_items)) if final.exists() else None


def write_verified_shard(out, i, shard_items, style, workers, report):
    """Writes shard i of `out` from its images (to .partial, verified, renamed) with `workers`
    processes; report(n) is called as images are written. Returns the shard's ids (-1: skipped)."""
    final = out / M.shard_name(i)
    partial_path = final.with_name(final.name + ".partial")
    with _writer_progress(report):
        write_shard(partial_path, shard_items, workers=workers, **style)
    ids = read_shard_ids(partial_path, _expected_ids(shard_items))
    if ids is None:
        raise RuntimeError(f"{partial_path}: the shard just written does not verify")
    os.replace(partial_path, final)
    return ids


def _tables(src, out, classes, lists, ids):
    """The manifest's columns, the skipped rows and the shards' metadata."""
    rows = {k: [] for k in M.SCHEMA.names}
    skipped, shard_meta = [], []
    for i, shard_items in enumerate(lists):
        for j, ((path, label, sid, size), got) in enumerate(zip(shard_items, ids[i])):
            rel = os.path.relpath(path, src)
            if got == -1:
                skipped.append({"id": sid, "label": label, "path": rel, "reason": _reason(path)})
                continue
            for k, v in zip(M.SCHEMA.names, (sid, i, j, label, classes[label], rel, size)):
                rows[k].append(v)
        shard_meta.append({"file": M.shard_name(i), "rows": len(shard_items),
                           "samples": int((ids[i] >= 0).sum())})
    return rows, skipped, shard_meta


# ---------------------------------------------------------------------------------------------
# Ray


class ShardError(RuntimeError):
    """A shard failed on its retry too; the CLI prints it as one line and exits with code 1."""


def _write_task(out, i, shard_items, style, cpus, progress):
    """One shard as a Ray task: its own list of images in, its ids out; progress: the driver's
    _Progress actor, told about every image written (from zero again on a retry)."""
    import ray

    ray.get(progress.start.remote(i))
    return write_verified_shard(out, i, shard_items, style, cpus,
                                lambda n: progress.add.remote(i, n))


class _Progress:
    """Images written per shard, summed for the driver's bar, and the attempts at each shard (a
    Ray actor)."""

    def __init__(self):
        self.done, self.attempts = {}, {}

    def start(self, shard):
        self.done[shard] = 0
        self.attempts[shard] = self.attempts.get(shard, 0) + 1

    def tries(self, shard):
        return self.attempts.get(shard, 0)

    def add(self, shard, n):
        self.done[shard] = self.done.get(shard, 0) + n

    def total(self):
        return sum(self.done.values())


def _write_on_ray(out, todo, style, address, cpus, bar):
    """Writes the shards of `todo` ({shard: images}) as Ray tasks, all of them even when some
    fail; returns {shard: ids}. Raises ShardError naming the first shard that failed twice."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    progress = ray.remote(num_cpus=0)(_Progress).remote()
    task = ray.remote(_write_task).options(num_cpus=cpus, max_retries=1, retry_exceptions=True,
                                           name="data_prep.convert shard")
    try:
        running = {task.remote(out, i, shard_items, style, cpus, progress): i
                   for i, shard_items in todo.items()}
        ids, failed = {}, {}
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            bar.update(ray.get(progress.total.remote()) - bar.n)
            for ref in ready:
                i = running.pop(ref)
                try:
                    ids[i] = ray.get(ref)
                except Exception as e:   # the task's error (after its retry), or its node's loss
                    failed[i] = e
        if failed:
            i = min(failed)
            tries = ray.get(progress.tries.remote(i))
            raise ShardError(f"shard {i} ({out / M.shard_name(i)}, images {todo[i][0][0]} .. "
                             f"{todo[i][-1][0]}) failed after {tries} attempts: {_one_line(failed[i])}"
                             + (f"; {len(failed) - 1} more shards failed" if len(failed) > 1 else ""))
        return ids
    finally:
        ray.kill(progress)


def _one_line(error):
    cause = getattr(error, "cause", None) or error    # a RayTaskError wraps the task's exception
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text}"


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
    p.add_argument("--workers", type=int, default=None,
                   help="writer processes when converting in this process (default: all cores)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to write the shards on, one Ray task per shard: 'auto' or "
                        "HOST:PORT (default: $RAY_ADDRESS if set, else convert in this process)")
    p.add_argument("--cpus-per-shard", type=int, default=1,
                   help="with Ray: CPUs (and writer processes) of each shard's task (default 1)")
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
                    limit_per_class=args.limit_per_class, overwrite=args.overwrite,
                    address=args.address or os.environ.get("RAY_ADDRESS"),   # set by `ray job submit`
                    cpus_per_shard=args.cpus_per_shard)
    except (ConvertError, ShardError) as e:
        print(f"python -m data_prep.convert: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConvertError) else 1
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
