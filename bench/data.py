"""Data benchmark: the ffcv two-view loader against the torchvision ImageFolder two-view loader.

    python bench/data.py [--images 3000] [--workers 2] [--batch 64]

Builds an ImageFolder tree of JPEGs at ImageNet-like sizes (about 400x350, smooth random content
with some texture, so the files are ImageNet-sized too), converts it with data_prep.convert
(default options: longer side 256, JPEG quality 90; --max-resolution 512 keeps the source
resolution, to separate ffcv's speed from that of decoding smaller stored images), and times both paths of
moco_ray.data.make_train_loader on it with the same worker count: ffcv with numba threads, the
fallback with a torch DataLoader of PIL-decoding processes. Each sample gives two views of
RandomResizedCrop(224, scale=(0.2, 1)) + flip, as uint8 -> float32 normalised NCHW. The colour
augmentations are left out of both (aug=None), since they run on the training device either way.
The ffcv pipeline is compiled (numba) before timing; each timing starts at the first batch.
"""
import argparse
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.convert import convert  # noqa: E402
from moco_ray import data as D  # noqa: E402


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


def time_epoch(path, args):
    """Images per second (each image: two 224px views) over one epoch, from the first batch on."""
    loader = D.make_train_loader(path, seed=0, epoch=0, start=0, batch_per_worker=args.batch, rank=0,
                                 world_size=1, res=224, aug=None, num_workers=args.workers)
    images, t0 = 0, None
    for q, k, _, sid in loader:
        if t0 is None:
            t0 = time.perf_counter()
            continue
        images += len(sid)
    return images / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--workers", type=int, default=2, help="ffcv threads = DataLoader processes")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="alternating timed epochs per loader")
    p.add_argument("--max-resolution", type=int, default=256,
                   help="conversion: longer side stored in the .beton (default 256, as convert)")
    p.add_argument("--dir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        src, out = root / "jpeg", root / f"ffcv-{args.max_resolution}"
        t = time.perf_counter()
        if not src.exists():
            make_tree(src, args.images, procs=args.workers)
        files = sorted(src.rglob("*.jpg"))
        sizes = [Image.open(f).size for f in files[:200]]
        mean_kb = np.mean([f.stat().st_size for f in files]) / 1024
        print(f"source: {len(files)} JPEGs, mean {np.mean([s[0] for s in sizes]):.0f}x"
              f"{np.mean([s[1] for s in sizes]):.0f} px, {mean_kb:.0f} KiB ({time.perf_counter() - t:.0f} s)")
        s = convert(src, out, workers=args.workers, max_resolution=args.max_resolution, progress=False)
        print(f"converted: {s['images']} images, {s['bytes'] / 2**20:.0f} MiB, {s['seconds']:.0f} s "
              f"({s['images_per_s']:.0f} images/s), max_resolution {args.max_resolution}, jpg q90")

        t = time.perf_counter()
        warm = D.make_train_loader(out, seed=1, epoch=0, start=0, batch_per_worker=args.batch, rank=0,
                                   world_size=1, res=224, aug=None, num_workers=args.workers)
        for i, _ in zip(range(3), warm):
            pass
        print(f"ffcv warm-up (numba compilation): {time.perf_counter() - t:.0f} s")

        rates = {"ffcv": [], "torchvision": []}
        for _ in range(args.repeats):
            rates["ffcv"].append(time_epoch(out, args))
            rates["torchvision"].append(time_epoch(src, args))
        print(f"workers {args.workers}, batch {args.batch}, two 224px views per image "
              f"(RandomResizedCrop + flip + normalise; no colour augmentation)")
        for name, r in rates.items():
            print(f"  {name:12s} {max(r):7.1f} images/s  (epochs: {', '.join(f'{x:.1f}' for x in r)})")
        ratio = max(rates["ffcv"]) / max(rates["torchvision"])
        print(f"  ratio ffcv / torchvision: {ratio:.2f}x (best epochs; median "
              f"{statistics.median(rates['ffcv']) / statistics.median(rates['torchvision']):.2f}x)")


if __name__ == "__main__":
    main()
