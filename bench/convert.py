"""Conversion benchmark: data_prep.convert with its shards as Ray tasks, 1 task against 2 tasks.

    python bench/convert.py [--images 3000] [--repeats 2] [--dir DIR]

The JPEG tree of bench/data.py (about 400x350, ImageNet-sized files) is converted on a local Ray
instance of 2 CPUs (default options: longer side 256, JPEG quality 90), once as 1 shard (1 task
of one CPU, one writer process) and once as 2 shards (2 tasks of one CPU each), alternating, each
conversion from scratch (--overwrite). Times are the whole conversion as the CLI runs it: listing,
tasks, manifest. A small conversion first starts Ray's workers and imports ffcv in them.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import make_tree  # noqa: E402  (bench/data.py)

from data_prep.convert import convert  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=2, help="alternating conversions per layout")
    p.add_argument("--dir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    args = p.parse_args()

    import ray

    from moco_ray.launch import start_ray

    start_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        src = root / "jpeg"
        if not src.exists():
            make_tree(src, args.images)
        warm = root / "warm-src"
        if not warm.exists():
            make_tree(warm, 40)
        convert(warm, root / "warm", shards=2, address=address, overwrite=True, progress=False)

        rates = {1: [], 2: []}
        for _ in range(args.repeats):
            for tasks in rates:
                s = convert(src, root / f"tasks-{tasks}", shards=tasks, address=address,
                            cpus_per_shard=1, overwrite=True, progress=False)
                rates[tasks].append(s["images_per_s"])
        print(f"{s['images']} JPEGs to 256 px shards on a local Ray of 2 CPUs, tasks of 1 CPU each")
        for tasks, r in rates.items():
            print(f"  {tasks} task{'s' if tasks > 1 else ' '} {max(r):7.1f} images/s  "
                  f"(runs: {', '.join(f'{x:.1f}' for x in r)})")
        print(f"  ratio 2 tasks / 1 task: {max(rates[2]) / max(rates[1]):.2f}x (best runs)")
    ray.shutdown()


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t:.0f} s)")
