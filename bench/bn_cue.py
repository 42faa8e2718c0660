"""How much a MoCo v3 encoder trained with per-worker BN reads its BN sub-batches: the in-batch top-1
and loss of its queries against the keys of the same batch, each key normalised in its query's
sub-batch (bn=split: the positive key is normalised with the same images as its query) and in a
sub-batch of the batch reshuffled (as bn=shuffle does). A gap means the loss uses the sub-batch
as a cue that in-batch negatives do not share (SimCLR's reason for global BN).

    python bench/bn_cue.py RUN_DIR_OR_CHECKPOINT [--batches 20]

One process on the CPU, no Ray: the run's config and newest valid checkpoint, its training loader
at one worker's share of the global batch, BN in training mode as in the step.
"""
import argparse

import torch

from moco_ray import checkpoint
from moco_ray import config as C
from moco_ray.data import make_train_loader
from moco_ray.loss_v3 import global_batch_info_nce
from moco_ray.step_v3 import usable_splits
from moco_ray.worker import build_model


def load_model(path):
    ckpt = checkpoint.newest_valid(path) or path
    state, _, manifest = checkpoint.load(ckpt, 0, 1, None)
    cfg = C.for_device(C.apply_overrides(C.Config(), dict(state["config"])), cuda=False)
    if cfg.method != "v3" or cfg.bn == "sync":
        raise SystemExit(f"error: {path} is not a MoCo v3 run with per-worker BN (method={cfg.method}, bn={cfg.bn})")
    model = build_model(cfg)
    model.encoder_q.load_state_dict(state["encoder_q"])
    model.encoder_k.load_state_dict(state["encoder_k"])
    return model.train(), cfg, manifest["world_size"]


def in_batch(q, k, T):
    """(cross-entropy, top-1) of each query against the batch's keys, its own the positive: v3's
    loss without its 2T scale."""
    loss, stats = global_batch_info_nce(q, k, T)
    return loss.item() / (2 * T), stats["acc"].item()


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--batches", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    model, cfg, W = load_model(args.path)
    b = cfg.batch_size // W
    model.set_splits(b)
    loader = make_train_loader(cfg.data, seed=cfg.seed, epoch=0, start=0, batch_per_worker=b, rank=0,
                               world_size=W, res=cfg.res, aug=cfg.aug, num_workers=1, crop_min=cfg.crop_min)
    rows = {"as its query's": [], "reshuffled": []}
    for i, (im_q, im_k, _, _) in zip(range(args.batches), loader):
        q1, _ = model.both_views(model.encoder_q, im_q, im_k)
        _, k2 = model.both_views(model.encoder_k, im_q, im_k)
        perm = torch.randperm(b)
        _, k2_shuffled = model.both_views(model.encoder_k, im_q[perm], im_k[perm])
        rows["as its query's"].append(in_batch(q1, k2, cfg.T))
        rows["reshuffled"].append(in_batch(q1, k2_shuffled[torch.argsort(perm)], cfg.T))
    size = b // usable_splits(b, cfg.bn_splits)
    print(f"{args.path}: {len(rows['reshuffled'])} batches of {b}, BN in sub-batches of {size}")
    print(f"{'key sub-batches':<16} {'in-batch top-1':>15} {'cross-entropy':>14}")
    for name, values in rows.items():
        ce, top1 = (sum(v[i] for v in values) / len(values) for i in (0, 1))
        print(f"{name:<16} {100 * top1:>14.1f}% {ce:>14.3f}")


if __name__ == "__main__":
    main()
