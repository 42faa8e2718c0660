"""CPU step time of MoCo v2, v2+ and v3 side by side, at one worker's share of a preset (demo size by
default: b = 64 / 2 workers images of 16 px); v3 both with its views in one pass (split BN: the
default) and with one pass per view; each method also in the other precision (bf16 autocast or fp32)
than its preset's, the demo presets differing there (demo-v3 runs bf16, as moco-v3 runs AMP).

    python bench/methods.py [--v2 demo] [--v3 demo-v3] [--workers 2] [--steps 20] [--threads 1]

One process, no Ray: each method's module from its config (moco_ray.worker.build_model), its
optimizer, forward + backward + step. The methods alternate step by step, so the load of a shared
machine hits them alike; the table gives the median time and the ratio to v2.
"""
import argparse
import dataclasses
import statistics
import time

import torch

from moco_ray import config as C
from moco_ray.optim import make_optimizer
from moco_ray.worker import build_model


def setup(cfg, fuse_views=True, precision=None):
    cfg = C.for_device(cfg if precision is None else dataclasses.replace(cfg, precision=precision), cuda=False)
    model = build_model(cfg)
    if not fuse_views:
        model.fuse_views = False
    optimizer = make_optimizer(cfg.optimizer, model.encoder_q.parameters(), cfg.lr, cfg.momentum,
                               cfg.weight_decay)
    return model, optimizer


def one_step(model, optimizer, im_q, im_k, step):
    t0 = time.perf_counter()
    loss, _ = model(im_q, im_k, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--v2", default="demo")
    p.add_argument("--v3", default="demo-v3")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    v2 = C.preset(args.v2)
    v3 = C.preset(args.v3)
    b = v2.batch_size // args.workers
    other = {"bf16": "fp32", "fp32": "bf16"}
    v2_other, v3_other = (other[C.for_device(cfg, cuda=False).precision] for cfg in (v2, v3))
    runs = {"v2": setup(v2), f"v2 {v2_other}": setup(v2, precision=v2_other),
            "v2+": setup(dataclasses.replace(v2, method="v2plus")), "v3": setup(v3),
            "v3 per view": setup(v3, fuse_views=False), f"v3 {v3_other}": setup(v3, precision=v3_other)}
    if not runs["v3"][0].fuse_views:
        del runs["v3 per view"]   # a BN that is not split: v3 already runs one pass per view
    times = {name: [] for name in runs}
    g = torch.Generator().manual_seed(0)
    for step in range(args.steps + 2):   # the first two steps warm up allocators and kernels
        im_q, im_k = (torch.randn(b, 3, v2.res, v2.res, generator=g) for _ in range(2))
        for name, (model, optimizer) in runs.items():
            seconds = one_step(model, optimizer, im_q, im_k, step)
            if step >= 2:
                times[name].append(seconds)
    base = statistics.median(times["v2"])
    print(f"batch {b} per worker, {v2.res} px, {args.threads} thread(s), median of {args.steps} steps")
    print(f"{'method':<12} {'preset':<12} {'precision':<9} {'step ms':>8} {'x v2':>6}")
    for name, (model, _) in runs.items():
        median = statistics.median(times[name])
        preset = args.v2 + (" v2plus" if name == "v2+" else "") if name.startswith("v2") else args.v3
        print(f"{name:<12} {preset:<12} {model.precision:<9} {median * 1e3:8.1f} {median / base:6.2f}")


if __name__ == "__main__":
    main()
