"""Checkpoint cost for a real-size model: save (write + sha256), verify, load with resharding.

    python bench/checkpoint.py [--arch resnet50] [--K 65536] [--world-size 8]

Runs outside Ray with the same functions the workers call; the W queue shards are written as the W
workers would (their bytes add up to one queue of K keys).
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from moco_ray import checkpoint
from moco_ray.model import build_encoder
from moco_ray.queue import KeyQueue


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--K", type=int, default=65536)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--world-size", type=int, default=8)
    args = p.parse_args()

    encoder_q = build_encoder(args.arch, args.dim, mlp=True, small_stem=False)
    encoder_k = build_encoder(args.arch, args.dim, mlp=True, small_stem=False)
    optimizer = torch.optim.SGD(encoder_q.parameters(), lr=0.03, momentum=0.9)
    encoder_q(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()  # materialise the momentum buffers
    state = {"encoder_q": encoder_q.state_dict(), "encoder_k": encoder_k.state_dict(),
             "optimizer": optimizer.state_dict(), "progress": {"step": 1}}
    W = args.world_size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / checkpoint.dir_name(1)
        path.mkdir()
        t0 = time.perf_counter()
        parts = [checkpoint.write_part(path, r, state if r == 0 else None,
                                       KeyQueue(args.K, args.dim, r, W).state_dict()) for r in range(W)]
        checkpoint.write_manifest(path, parts, {"step": 1})
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        checkpoint.verify(path)
        t_verify = time.perf_counter() - t0
        t0 = time.perf_counter()
        checkpoint.load(path, 0, W // 2, args.K)
        t_load = time.perf_counter() - t0
        sizes = {f.name: f.stat().st_size for f in path.iterdir()}
    total = sum(sizes.values())
    queue = sum(v for k, v in sizes.items() if k.startswith("queue-"))
    print(f"{args.arch}, K={args.K}, D={args.dim}, W={W} queue shards")
    print(f"  size       {total / 2**20:8.1f} MiB  (model+optimizer {sizes[checkpoint.STATE] / 2**20:.1f} MiB, "
          f"queue {queue / 2**20:.1f} MiB in {W} shards of {queue / W / 2**20:.2f} MiB)")
    print(f"  save       {t_save:8.2f} s  (all {W} ranks' files written here in series, sha256 included)")
    print(f"  verify     {t_verify:8.2f} s  (sha256 of every file)")
    print(f"  load       {t_load:8.2f} s  (one rank, resharded {W} -> {W // 2})")


if __name__ == "__main__":
    main()
