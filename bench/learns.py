"""Does MoCo learn on the embedded dataset? kNN top-1 of raw pixels, of the random-init encoder and
of the encoder pretrained for a number of steps, in one process without Ray: a fast loop for
choosing the demo's res, crop_min, K, m, T, lr and epochs before running `make demo`.

    python bench/learns.py [--set KEY=VALUE ...] [--steps N] [--eval-every N] [--data ROOT]
                           [--clutter KEY=JSON ... --data ROOT]

One process plays the demo's W workers: the global batch B goes through one MoCo module (split-BN
over bn_splits * W sub-batches, so each normalises b = B / W / bn_splits images as a demo worker's
do), with the demo preset's augmentations and the real FFCV loaders. The lr schedule runs over
`epochs` as in a real run; --steps stops early (0: all epochs). Prints one line per evaluation:
step, images seen, seconds, loss, the three kNN numbers, and the lead of the pretrained encoder
over the better baseline.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moco_ray import config as C, data, knn  # noqa: E402
from moco_ray.step import MoCo  # noqa: E402
from moco_ray.worker import backbone_of, learning_rate  # noqa: E402


def loaders(cfg, batch=256):
    """The kNN bank (train split) and queries (val split), un-augmented, at the training res."""
    bank = data.make_eval_loader(cfg.data, batch_size=batch, rank=0, world_size=1, res=cfg.res,
                                 per_class=cfg.knn_bank_per_class, seed=cfg.seed)
    query = data.make_eval_loader(cfg.knn_data, batch_size=batch, rank=0, world_size=1, res=cfg.res)
    return bank, query


def knn_of(cfg, backbone):
    bank, query = loaders(cfg)
    return knn.knn_top1(backbone, bank, query, data.dataset_info(cfg.data)["num_classes"], cfg.knn_k,
                        cfg.knn_t, torch.device("cpu"), chunk=cfg.knn_chunk)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workers", type=int, default=2, help="the demo workers this process stands for")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between kNN evaluations")
    p.add_argument("--data", default=None, help="embedded dataset root (default: built on first use)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clutter", action="append", default=[], metavar="KEY=JSON",
                   help="a scene parameter of the cluttered dataset (data_prep.demo.CLUTTER), e.g. "
                        "tint=0.05 or 'scale=[0.6,0.95]': trains on that dataset; needs --data, so the "
                        "default cache stays as it is")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from data_prep import demo
    from data_prep.demo import build_demo

    if args.clutter and not args.data:
        p.error("--clutter needs --data ROOT (a root of its own for the variant)")
    for item in args.clutter:
        key, _, value = item.partition("=")
        if key not in demo.CLUTTER:
            p.error(f"--clutter: unknown key {key!r}; choose one of {', '.join(demo.CLUTTER)}")
        value = json.loads(value)
        demo.CLUTTER[key] = tuple(value) if isinstance(value, list) else value

    paths = build_demo(args.data, "cluttered" if args.clutter else demo.DEFAULT)
    cfg = C.load("demo", [f"data={paths['train']}", f"knn_data={paths['val']}", *args.set])
    torch.manual_seed(cfg.seed)
    model = MoCo(arch=cfg.arch, dim=cfg.dim, K=cfg.K, m=cfg.m, T=cfg.T, mlp=cfg.mlp, small_stem=cfg.small_stem,
                 bn="split", bn_splits=cfg.bn_splits * args.workers, seed=cfg.seed, head_bn=cfg.head_bn,
                 zero_init_residual=cfg.zero_init_residual, width=cfg.width)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    with backbone_of(model.encoder_q) as backbone:
        pixels = knn_of(cfg, torch.nn.Flatten())
        init = knn_of(cfg, backbone)
    print(f"{'step':>6} {'images':>8} {'s':>6} {'loss':>6}  pixels  init  pretrained  lead", flush=True)
    print(f"{0:>6} {0:>8} {0:>6} {'':>6}  {pixels:6.1f} {init:5.1f} {init:11.1f} {init - max(pixels, init):5.1f}",
          flush=True)
    n, B = data.dataset_info(cfg.data)["n"], cfg.batch_size
    steps_per_epoch, step, t0 = n // B, 0, time.perf_counter()
    total = args.steps or steps_per_epoch * cfg.epochs
    for epoch in range(cfg.epochs):
        loader = data.make_train_loader(cfg.data, seed=cfg.seed, epoch=epoch, start=0, batch_per_worker=B,
                                        rank=0, world_size=1, res=cfg.res, aug=cfg.aug,
                                        num_workers=cfg.loader_workers, crop_min=cfg.crop_min)
        for im_q, im_k, _, _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, B, epoch + (step % steps_per_epoch) / steps_per_epoch)
            loss, _ = model(im_q, im_k, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.eval_every == 0 or step == total:
                seconds = time.perf_counter() - t0
                with backbone_of(model.encoder_q) as backbone:
                    top1 = knn_of(cfg, backbone)
                print(f"{step:>6} {step * B:>8} {seconds:6.0f} {loss.item():6.2f}  {pixels:6.1f} {init:5.1f} "
                      f"{top1:11.1f} {top1 - max(pixels, init):5.1f}", flush=True)
                t0 += time.perf_counter() - t0 - seconds   # the evaluation is not training time
            if step == total:
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
