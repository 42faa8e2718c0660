"""Data benchmark: the ffcv two-view loader against the torchvision ImageFolder two-view loader.

    python bench/data.py [--images 3000] [--workers 2] [--batch 64] [--res 224] [--dct] [--regions]
    python bench/data.py --assembly-only [--batch 64] [--res 224] [--shards 16]

Builds an ImageFolder tree of JPEGs at ImageNet-like sizes (about 400x350, smooth random content
with some texture, so the files are ImageNet-sized too) and converts it twice with data_prep.convert
(JPEG quality 90): at the converter's default longer side of 256 and at source resolution. Then it
times both paths of moco_ray.data.make_train_loader with the same worker count, for each stored
resolution in turn: ffcv with numba threads (both views from one decode, moco_ray.two_views), the
fallback with a torch DataLoader of PIL-decoding processes. Each sample gives two views of
RandomResizedCrop(res, scale=(0.2, 1)) + flip, as uint8 -> float32 normalised NCHW. The colour
augmentations are left out of both (aug=None), since they run on the training device either way.
The ffcv pipeline is compiled (numba) before timing; each timing starts at the first batch, and the
two loaders' epochs alternate, so that a busy machine slows both alike.

Where one sample's time goes, for each stored resolution, single-threaded on the same images (CPU
time, summed over the loader's threads): decode (libjpeg-turbo, as ffcv calls it), crop + resize of
both views (OpenCV INTER_AREA, as ffcv), the rest of ffcv's reader (its time per sample with one
numba thread, best of two epochs, minus those two: reading, the CHW transpose and flip, batching,
the batch's assembly into one dense tensor per view), and copies on the training thread (the uint8
-> float32 normalisation of both views, one conversion and one fused multiply-add each).
Best-of-several timings; the standalone decode and crop + resize carry Python call overhead, so a
rest near zero can come out negative.

Batch assembly (also alone: --assembly-only, no conversion): putting a batch of `--batch` two-view
samples from `--shards` shards back in epoch order on one thread (moco_ray.data.assemble: one
dense tensor per view, one copy), beside one plain copy of the same bytes (the target: <= 1.5x)
and beside an index_put into a (B, 2, 3, H, W) buffer (the direct way to gather the samples).

--dct: how far a DCT-scaled decode (1/d) moves a view from the full decode, for each margin (the
decoder uses 1/d only when both crops are >= margin * d x the output), beside the resize's own
error (OpenCV INTER_AREA against torchvision's antialiased bilinear on the same crop).
--regions: what decoding only the crops' region would give (ffcv's imdecode crop argument: a
lossless libjpeg-turbo crop, then a decode of it), for one region covering both crops and for one
region per crop, against the one full decode.
"""
import argparse
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import manifest as M  # noqa: E402
from data_prep.convert import convert  # noqa: E402
from moco_ray import data as D  # noqa: E402
from moco_ray.augment import augment  # noqa: E402

MCU = 16   # libjpeg-turbo crops on MCU boundaries: 16 px for the converter's 4:2:0 JPEGs


def synthetic_jpeg(args):
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(330, 470)), int(rng.integers(290, 410))
    img = np.zeros((h, w, 3))
    for cells, amp in ((3, 110), (12, 50), (48, 30), (160, 25)):   # smooth shapes, then texture
        noise = rng.uniform(-amp, amp, (cells, cells, 3)).astype(np.float32)
        img += np.stack([np.asarray(Image.fromarray(noise[..., c], mode="F").resize((w, h), Image.BICUBIC))
                         for c in range(3)], -1)
    img += 128 + rng.normal(0, 8, img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_tree(root, n, classes=10, procs=2):
    jobs = []
    for i in range(n):
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((d / f"{i:06d}.jpg", i))
    with Pool(procs) as pool:
        pool.map(synthetic_jpeg, jobs, chunksize=32)


def train_loader(path, args, workers=None, seed=0):
    return D.make_train_loader(path, seed=seed, epoch=0, start=0, batch_per_worker=args.batch, rank=0,
                               world_size=1, res=args.res, aug=None,
                               num_workers=args.workers if workers is None else workers)


def time_epoch(path, args, workers=None):
    """Images per second (each image: two views) over one epoch, from the first batch on."""
    images, t0 = 0, None
    for q, k, _, sid in train_loader(path, args, workers):
        if t0 is None:
            t0 = time.perf_counter()
            continue
        images += len(sid)
    return images / (time.perf_counter() - t0)


def stored_jpegs(out, n):
    """The first n stored JPEGs of a conversion: (bytes as uint8 array, height, width)."""
    from ffcv.reader import Reader

    path = M.read_manifest(out).shard_path(0)
    r = Reader(str(path))
    size_at = dict(zip(r.alloc_table["ptr"].tolist(), r.alloc_table["size"].tolist()))
    raw = np.fromfile(path, np.uint8)
    found = []
    for m in r.metadata["f0"][:n]:
        if m["mode"] == 0:
            ptr = int(m["data_ptr"])
            found.append((raw[ptr:ptr + size_at[ptr]].copy(), int(m["height"]), int(m["width"])))
    return found


def decode(data, h, w, d=1):
    from ffcv.libffcv import imdecode

    img = np.empty((-(-h // d), -(-w // d), 3), np.uint8)
    imdecode(data, img, h, w, h, w, 0, 0, 1, d, False, False)
    return img


def two_crops(h, w, rng, scale=(0.2, 1.0)):
    from ffcv.fields.rgb_image import get_random_crop

    np.random.seed(int(rng.integers(1 << 31)))
    return [get_random_crop(h, w, np.array(scale), np.array((3 / 4, 4 / 3))) for _ in range(2)]


def per_sample(fn, items, repeats=5):
    """Seconds per item of fn(item), best of `repeats` passes."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - t) / len(items))
    return best


def reader_seconds(out, args):
    """Seconds per sample of ffcv's reader alone (one numba thread): the uint8 views, before the
    training thread's float conversion."""
    n = D.dataset_info(out)["n"]
    rows = D.rank_indices(D.epoch_order(0, 0, n), 0, args.batch, 0, 1)
    sizes = [args.batch] * (len(rows) // args.batch)
    t0 = None
    for i, _ in enumerate(D._batches(out, rows, sizes, "train", args.res, 1, torch.device("cpu"))):
        if i == 0:
            t0 = time.perf_counter()
    return (time.perf_counter() - t0) / (sum(sizes) - sizes[0])


def breakdown(out, args, reader_s):
    """Milliseconds per sample: decode, crop + resize (both views), copies, the rest (the
    reader's time beyond its decode and crop + resize)."""
    from ffcv.libffcv import resize_crop

    jpegs = stored_jpegs(out, 300)
    rng = np.random.default_rng(0)
    decoded = [(decode(*j), two_crops(j[1], j[2], rng)) for j in jpegs]
    view = np.empty((args.res, args.res, 3), np.uint8)

    def crop_resize(item):
        img, crops = item
        for i, j, h, w in crops:
            resize_crop(img, i, i + h, j, j + w, view)
            view[:] = view[:, ::-1]

    q, k = torch.zeros(2, args.batch, 3, args.res, args.res, dtype=torch.uint8)   # as assembled

    def copies(_):
        augment(q, None), augment(k, None)

    times = {"decode": per_sample(lambda j: decode(*j), jpegs),
             "crop + resize": per_sample(crop_resize, decoded)}
    times["rest"] = reader_s - sum(times.values())
    times["copies"] = per_sample(copies, range(20)) / args.batch
    return {k: 1e3 * v for k, v in times.items()}


def dct_errors(out, args, margins=(1, 2)):
    """Mean |view - full-decode view| per margin, and the resize's own error, over the stored JPEGs."""
    import cv2
    import torchvision.transforms.v2.functional as TF

    from moco_ray.two_views import dct_denominator, scaled_span

    rng = np.random.default_rng(1)
    res, errs = args.dct_res, {m: [] for m in margins}
    own = []
    for data, h, w in stored_jpegs(out, 200):
        full = decode(data, h, w)
        for i, j, ch, cw in two_crops(h, w, rng):
            for m in margins:
                d = dct_denominator(ch, cw, res, res, m)
                if d == 1:
                    continue
                r0, r1, i2, h2 = scaled_span(i, ch, d, h)
                c0, c1, j2, w2 = scaled_span(j, cw, d, w)
                small = cv2.resize(np.ascontiguousarray(decode(data, h, w, d)[r0:r1, c0:c1]), (res, res),
                                   interpolation=cv2.INTER_AREA)
                ref = cv2.resize(np.ascontiguousarray(full[i2:i2 + h2, j2:j2 + w2]), (res, res),
                                 interpolation=cv2.INTER_AREA)
                errs[m].append(np.abs(small.astype(float) - ref).mean())
            ref = cv2.resize(np.ascontiguousarray(full[i:i + ch, j:j + cw]), (res, res), interpolation=cv2.INTER_AREA)
            tv = TF.resized_crop(torch.from_numpy(full).permute(2, 0, 1), i, j, ch, cw, [res, res], antialias=True)
            own.append(np.abs(tv.permute(1, 2, 0).numpy().astype(float) - ref).mean())
    return errs, float(np.mean(own))


def region(crops, h, w):
    """The MCU-aligned box (y, x, height, width) covering the given crops."""
    y0 = min(i for i, _, _, _ in crops) // MCU * MCU
    x0 = min(j for _, j, _, _ in crops) // MCU * MCU
    y1 = max(i + ch for i, _, ch, _ in crops)
    x1 = max(j + cw for _, j, _, cw in crops)
    return y0, x0, y1 - y0, x1 - x0


def region_decode(data, h, w, box, buf):
    from ffcv.libffcv import imdecode

    y, x, rh, rw = box
    imdecode(data, buf, h, w, rh, rw, x, y, 1, 1, True, False)


def region_times(out):
    """Milliseconds per sample: one full decode, one decode of a region covering both crops,
    one decode per crop's region; and the mean share of the image those regions cover."""
    rng = np.random.default_rng(2)
    items = [(data, h, w, two_crops(h, w, rng)) for data, h, w in stored_jpegs(out, 300)]
    buf = np.empty(max(h * w for _, h, w, _ in items) * 3, np.uint8)
    full = per_sample(lambda it: decode(*it[:3]), items)
    union = per_sample(lambda it: region_decode(*it[:3], region(it[3], *it[1:3]), buf), items)
    each = per_sample(lambda it: [region_decode(*it[:3], region([c], *it[1:3]), buf) for c in it[3]], items)
    share = np.mean([region(it[3], *it[1:3])[2] * region(it[3], *it[1:3])[3] / (it[1] * it[2]) for it in items])
    return {"full": 1e3 * full, "union": 1e3 * union, "each": 1e3 * each, "share": share}


def assembly_times(args, repeats=20):
    """Milliseconds for one batch on one thread (best of `repeats`): assemble() from the shards'
    parts (views of ffcv-like (chunk, 2, 3, H, W) buffers), one plain copy of the same bytes into
    fresh memory, an index_put into a (B, 2, 3, H, W) buffer."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)    # Ray gives GPU workers OMP_NUM_THREADS=1
    rng = np.random.default_rng(0)
    size, res = args.batch, args.res
    shard = rng.integers(0, args.shards, size)
    pieces = []
    for s in np.unique(shard):
        where = np.flatnonzero(shard == s)
        buffer = torch.from_numpy(rng.integers(0, 256, (len(where) + 8, 2, 3, res, res), dtype=np.uint8))
        ids = torch.from_numpy(where).view(-1, 1).int()
        pieces.append((where, {M.IMAGE: buffer[:len(where)], M.ID: ids, M.LABEL: ids}))
    src = torch.randint(0, 256, (size, 2, 3, res, res), dtype=torch.uint8)

    def index_put():
        out = torch.empty_like(src)
        for where, part in pieces:
            out[torch.from_numpy(where)] = part[M.IMAGE]
        return out.unbind(1)

    # assemble and the plain copy interleaved (each writes a fresh batch's worth of memory, as the
    # loader does every batch), then the index_put: its larger allocations would change what the
    # allocator hands the other two
    best = {}
    for group in ({"assemble": lambda: D.assemble(pieces, size),
                   "plain copy": lambda: torch.empty_like(src).copy_(src)},
                  {"index_put (before)": index_put}):
        for _ in range(repeats):
            for name, fn in group.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    torch.set_num_threads(torch_threads)
    return {k: 1e3 * v for k, v in best.items()}


def print_assembly(args):
    t = assembly_times(args)
    print(f"batch assembly, {args.batch} samples x 2 views x {args.res}px from {args.shards} shards "
          f"({args.batch * 2 * 3 * args.res ** 2 / 1e6:.1f} MB), one thread (ms): "
          + " | ".join(f"{k} {v:.2f} ({v / t['plain copy']:.2f}x plain copy)" for k, v in t.items()))


def compare(outs, src, args):
    """Alternating timed epochs of ffcv (per stored resolution) and torchvision: best images/s."""
    rates = {name: [] for name in [*outs, "torchvision"]}
    for _ in range(args.repeats):
        for name, out in outs.items():
            rates[name].append(time_epoch(out, args))
        rates["torchvision"].append(time_epoch(src, args))
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--workers", type=int, default=2, help="ffcv threads = DataLoader processes")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--res", type=int, default=224, help="output size of each view")
    p.add_argument("--repeats", type=int, default=2, help="alternating timed epochs per loader")
    p.add_argument("--dct", action="store_true", help="measure the DCT-scaled decode's error")
    p.add_argument("--dct-res", type=int, default=64, help="--dct: output size (small, so that 1/d applies)")
    p.add_argument("--regions", action="store_true", help="measure decoding only the crops' region")
    p.add_argument("--dir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    p.add_argument("--shards", type=int, default=16, help="shards a batch is assembled from")
    p.add_argument("--assembly-only", action="store_true", help="only the batch assembly timing")
    args = p.parse_args()
    print_assembly(args)
    if args.assembly_only:
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        src = root / "jpeg"
        t = time.perf_counter()
        if not src.exists():
            make_tree(src, args.images, procs=args.workers)
        files = sorted(src.rglob("*.jpg"))
        sizes = np.array([Image.open(f).size for f in files])
        print(f"source: {len(files)} JPEGs, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} px, "
              f"{np.mean([f.stat().st_size for f in files]) / 1024:.0f} KiB ({time.perf_counter() - t:.0f} s)")
        source_res = int(sizes.max())
        outs = {}
        for name, max_res in (("ffcv 256", 256), ("ffcv source", source_res)):
            outs[name] = root / f"ffcv-{max_res}"
            s = convert(src, outs[name], workers=args.workers, max_resolution=max_res, progress=False)
            print(f"converted ({name}): {s['images']} images, {s['bytes'] / 2**20:.0f} MiB, "
                  f"{s['seconds']:.0f} s, max_resolution {max_res}, jpg q90")

        t = time.perf_counter()
        for out in outs.values():
            for workers in (args.workers, 1):
                for _ in zip(range(2), train_loader(out, args, workers, seed=1)):
                    pass
        print(f"ffcv warm-up (numba compilation): {time.perf_counter() - t:.0f} s")

        rates = compare(outs, src, args)
        print(f"workers {args.workers}, batch {args.batch}, two {args.res}px views per image "
              f"(RandomResizedCrop + flip + normalise; no colour augmentation)")
        tv = max(rates["torchvision"])
        for name, r in rates.items():
            median = statistics.median(r) / statistics.median(rates["torchvision"])
            ratio = f"{max(r) / tv:5.2f}x torchvision (median {median:.2f}x)"
            print(f"  {name:12s} {max(r):7.1f} images/s  {'' if name == 'torchvision' else ratio}"
                  f"  (epochs: {', '.join(f'{x:.1f}' for x in r)})")

        print("one sample, one thread (ms): decode | crop + resize (2 views) | rest of the reader | "
              "copies (training thread)")
        for name, out in outs.items():
            parts = breakdown(out, args, min(reader_seconds(out, args) for _ in range(2)))
            total = sum(parts.values())
            print(f"  {name:12s} " + " | ".join(f"{k} {v:.2f} ({100 * v / total:.0f}%)" for k, v in parts.items())
                  + f" | total {total:.2f}")

        if args.dct:
            errs, own = dct_errors(outs["ffcv source"], args)
            print(f"DCT-scaled decode at {args.dct_res}px (source resolution): the resize's own error "
                  f"{own:.2f} grey levels (INTER_AREA vs torchvision antialiased bilinear)")
            for m, e in errs.items():
                print(f"  margin {m}: {len(e)} crops scaled, mean |scaled - full| {np.mean(e):.2f}, "
                      f"max {np.max(e):.2f}" if e else f"  margin {m}: no crop qualifies")
        if args.regions:
            for name, out in outs.items():
                r = region_times(out)
                print(f"region decode ({name}): full {r['full']:.2f} ms, one region covering both crops "
                      f"{r['union']:.2f} ms ({100 * r['share']:.0f}% of the image), one per crop {r['each']:.2f} ms")


if __name__ == "__main__":
    main()
