"""Shuffled BN: move the key images to random workers with all_to_all, and the features back.

The global batch is the concatenation of the W local batches (b each, in rank order). Position p
of the shuffled global batch holds sample perm[p]; worker r gets positions r*b .. r*b+b-1. perm is
drawn from a generator seeded by (seed, step), so every worker knows it and nothing is broadcast.
Each worker sends and receives b images (part of them to itself), a W-times smaller volume than
the all_gather of the original code. With W == 1 it is a local shuffle, for split-BN.
"""
import torch

from .collectives import all_to_all, world
from .queue import seeded_generator


def shuffle(x, seed, step, group=None, local=False):
    """Return (x_shuffled, ctx): this worker's b images of the shuffled global batch.

    local=True shuffles only within this worker's batch, whatever W (split-BN)."""
    rank, W = (0, 1) if local else world(group)
    b = x.shape[0]
    perm = torch.randperm(b * W, generator=seeded_generator(seed, step))
    if W == 1:
        return x[perm.to(x.device)], dict(perm=perm, W=1)
    mine = slice(rank * b, (rank + 1) * b)
    dest = torch.argsort(perm)[mine]            # new position of each of my samples
    send = torch.argsort(dest)                   # my samples in new-position order: grouped by worker
    src = perm[mine] // b                        # the worker each of my new positions comes from
    recv = torch.argsort(src, stable=True)       # rows arrive grouped by source, in position order
    ctx = dict(perm=perm, W=W, group=group, send=send.to(x.device), recv=recv.to(x.device),
               in_splits=torch.bincount(dest // b, minlength=W).tolist(),
               out_splits=torch.bincount(src, minlength=W).tolist())
    y = all_to_all(x[ctx["send"]], ctx["out_splits"], ctx["in_splits"], group)
    return y[torch.argsort(ctx["recv"])], ctx


def unshuffle(y, ctx):
    """Inverse of shuffle: the rows of y (features of the shuffled batch) back to their owners."""
    if ctx["W"] == 1:
        return y[torch.argsort(ctx["perm"]).to(y.device)]
    z = all_to_all(y[ctx["recv"]], ctx["in_splits"], ctx["out_splits"], ctx["group"])
    return z[torch.argsort(ctx["send"])]
