"""One kNN evaluation: the sharded monitor (moco_ray.knn) vs one that gathers the bank, side by side.

    python bench/knn.py [--n 10000,100000,1000000] [--queries 2000] [--dim 128] [--classes 1000]

Synthetic L2-normalised features (d=128, 1000 classes, k=200, t=0.1) sharded over W=2 spawned
processes joined by gloo, one thread each. Every (version, n) runs in fresh processes; "peak" is the
most memory one rank added from before its shard and queries existed to the end of the evaluation
(VmHWM, reset then: ru_maxrss would include the parent's RSS at the fork); "formula" is
moco_ray.knn.peak_bytes.
(old) the gathering monitor: all_gather the bank (padded) and the queries onto every rank,
      one query x bank similarity matrix, a query x k x classes one-hot vote. It is skipped where
      its estimated peak (3 n (4d + 16) + 4 q n + 12 q k C bytes per rank) does not fit in the
      memory available.
(new) moco_ray.knn.predict + top1 with the default knn_chunk.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moco_ray import knn  # noqa: E402
from moco_ray.worker import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

K, T = 200, 0.1


def all_gather_padded(x):
    """The gathering monitor's gather: every rank's rows, padded to the longest, concatenated on every rank."""
    padded = torch.zeros_like(x)
    padded[: len(x)] = x
    out = [torch.zeros_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(out, padded)
    return torch.cat(out)


def old_top1(query, query_y, bank, bank_y, num_classes):
    bank, bank_y = all_gather_padded(bank), all_gather_padded(bank_y)
    order = torch.arange(len(bank))              # the bank in sample-id order: one more copy
    bank, bank_y = bank[order], bank_y[order]
    query, query_y = all_gather_padded(query), all_gather_padded(query_y)
    sim = query @ bank.T
    sim_k, idx_k = sim.topk(min(K, len(bank)), dim=1)
    weights = (sim_k / T).exp()
    one_hot = F.one_hot(bank_y[idx_k], num_classes).to(weights.dtype)
    pred = (one_hot * weights.unsqueeze(-1)).sum(dim=1).argmax(dim=1)
    return 100.0 * (pred == query_y).float().mean().item()


def new_top1(query, query_y, bank, bank_y, num_classes):
    return knn.top1(knn.predict(query, bank, bank_y, num_classes, k=K, t=T), query_y)


def old_estimate(n, q, dim, num_classes):
    return 3 * n * (4 * dim + 16) + 4 * q * n + 12 * q * K * num_classes


def available_bytes():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def worker(rank, world, tmp, version, n, q, dim, num_classes):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    run = old_top1 if version == "old" else new_top1
    tiny = torch.eye(4, dim)                         # load the code it runs before measuring
    run(tiny, torch.arange(4), tiny, torch.arange(4), num_classes)
    reset_peak_rss()
    before = rss_bytes()
    g = torch.Generator().manual_seed(rank)
    bank = torch.randn(n // world, dim, generator=g)
    bank /= bank.norm(dim=1, keepdim=True)
    bank_y = torch.randint(0, num_classes, (n // world,), generator=g)
    query = F.normalize(bank[: q // world] + 0.5 * torch.randn(q // world, dim, generator=g), dim=1)
    query_y = bank_y[: q // world].clone()
    dist.barrier()
    t0 = time.perf_counter()
    top1 = run(query, query_y, bank, bank_y, num_classes)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes() - before
    torch.save((seconds, peak, top1), os.path.join(tmp, f"{rank}.pt"))
    dist.destroy_process_group()


def measure(version, n, q, dim, num_classes, world):
    """(seconds, peak bytes added, top-1) of one evaluation, the worst rank."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, tmp, version, n, q, dim, num_classes), nprocs=world, join=True)
        out = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]
    return max(s for s, _, _ in out), max(p for _, p, _ in out), out[0][2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="10000,100000,1000000", help="bank sizes, comma-separated")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    args = p.parse_args()
    world, mib = 2, 2 ** 20
    try:
        sizes = [int(v) for v in args.n.split(",")]
    except ValueError:
        p.exit(2, f"error: --n expects comma-separated integers, got {args.n!r}\n")
    if min(sizes + [args.queries]) < world or min(args.dim, args.classes) < 1:
        p.exit(2, f"error: bank sizes and --queries must be >= {world} (one per rank), --dim and --classes >= 1\n")
    print(f"W={world}, q={args.queries}, d={args.dim}, C={args.classes}, k={K}, "
          f"knn_chunk={knn.CHUNK}; times in s, peaks in MiB per rank")
    print(f"{'n':>9} | {'old s':>7} {'new s':>7} | {'old peak':>9} {'new peak':>9} {'formula':>8} | "
          f"{'old top1':>8} {'new top1':>8}")
    for n in sizes:
        new = measure("new", n, args.queries, args.dim, args.classes, world)
        need, have = world * old_estimate(n, args.queries, args.dim, args.classes), available_bytes()
        if need < 0.7 * have:
            old = measure("old", n, args.queries, args.dim, args.classes, world)
            old_cols = f"{old[0]:7.2f}", f"{old[1] / mib:9.0f}", f"{old[2]:8.2f}"
        else:
            old_cols = f"{'skip':>7}", f"{'skip':>9}", f"{'skip':>8}"
        formula = knn.peak_bytes(n, args.queries, world, args.dim, args.classes, K) / mib
        print(f"{n:>9,} | {old_cols[0]} {new[0]:7.2f} | {old_cols[1]} {new[1] / mib:9.0f} {formula:8.0f} | "
              f"{old_cols[2]} {new[2]:8.2f}", flush=True)
        if old_cols[0].strip() == "skip":
            print(f"{'':>9}   old skipped: it would need ~{need / 2**30:.1f} GiB for {world} ranks, "
                  f"{have / 2**30:.1f} GiB available")


if __name__ == "__main__":
    main()
