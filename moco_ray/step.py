"""One MoCo step on one worker (Algorithm 1 of the paper), with a sharded queue and shuffled BN."""
import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .collectives import world
from .loss import sharded_info_nce
from .model import MomentumUpdate, build_encoder, set_bn_splits
from .precision import autocast, memory_format
from .queue import KeyQueue
from .shuffle import shuffle, unshuffle


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and this worker's shard of the key queue.

    bn: "shuffle" (all_to_all shuffle of the keys across workers; split-BN when W == 1),
    "sync" (SyncBatchNorm in both encoders, no shuffle; torch supports it on GPU only) or
    "split" (split-BN over bn_splits sub-batches of a locally shuffled batch, any W).
    Build it after init_process_group: the queue shard depends on (rank, W) of `group`.
    encoder_q may then be replaced by DistributedDataParallel(encoder_q); the queue is not a
    module buffer, so neither DDP nor state_dict() touch it (save queue.state_dict() per worker).

    precision ("fp32", "bf16", "fp16") is the autocast dtype of both encoders; q and k are
    normalised in fp32 and the loss is computed in fp32. channels_last puts the input images in
    that memory format (convert the model with .to(memory_format=torch.channels_last) too).
    """

    def __init__(self, arch="resnet50", dim=128, K=65536, m=0.999, T=0.07, mlp=False,
                 small_stem=False, bn="shuffle", bn_splits=8, seed=0, group=None, head_bn=False,
                 precision="fp32", channels_last=False, zero_init_residual=False, width=64):
        super().__init__()
        if bn not in ("shuffle", "sync", "split"):
            raise ValueError(f"bn must be shuffle, sync or split, got {bn!r}")
        self.K, self.m, self.T, self.bn, self.bn_splits, self.seed = K, m, T, bn, bn_splits, seed
        self.group = group
        self.precision, self.channels_last = precision, channels_last
        self.rank, self.world_size = world(group)
        self.split_bn = bn == "split" or (bn == "shuffle" and self.world_size == 1)

        self.encoder_q = build_encoder(arch, dim, mlp, small_stem, head_bn=head_bn,
                                       zero_init_residual=zero_init_residual, width=width)
        if bn == "sync":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q, group)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False

        self.momentum_update = MomentumUpdate(self.encoder_q, self.encoder_k)
        self.queue = KeyQueue(K, dim, self.rank, self.world_size, seed)

    def forward(self, im_q, im_k, step, aug_k=None, micro=None, backward=None):
        """Loss of the local queries (DDP averages the gradients) and detached stats.

        im_k: the key images as float, or uint8 views that aug_k (uint8 batch -> normalised float
        batch, e.g. moco_ray.augment.augment) augments after the shuffle: the all_to_all of
        shuffled BN then moves 1 byte per pixel, not 4 (b x 3 x 224^2: 9.6 MB per rank and step at
        b=64, not 38.5 MB). The colour augmentation is drawn per sample, so where it runs does
        not change the keys' distribution.

        micro: the sizes of the micro-batches the b local images are taken in (micro_batches();
        None: one). The step is the same as with one batch: the momentum update once, before the
        first keys; every micro-batch's queries scored against the queue as it was at the start
        of the step; the keys of all micro-batches enqueued after the last; the loss the mean
        over all b local queries. backward(loss) backpropagates each micro-batch but the last,
        under DDP's no_sync (gradients accumulate locally, one all-reduce per step); the
        returned loss carries the last one's graph, for the caller's backward and optimizer
        step. What changes: BN statistics (and the shuffle of shuffled BN, and split-BN's
        sub-batches) are per micro-batch.
        """
        if self.queue.keys.device != im_q.device:
            self.queue.to(im_q.device)
        if self.bn == "sync" and self.world_size > 1 and im_q.device.type == "cpu":
            raise ValueError("bn=sync needs GPUs (torch's SyncBatchNorm); use bn=shuffle on CPU")
        micro = micro or [im_q.shape[0]]
        if len(micro) > 1 and backward is None:
            raise ValueError("micro-batches need backward: the loss of each but the last is backpropagated here")
        b, start, keys, done = im_q.shape[0], 0, [], []
        for j, size in enumerate(micro):
            part, last = slice(start, start + size), j == len(micro) - 1
            with contextlib.nullcontext() if last else no_sync(self.encoder_q):
                loss, stats = self.micro_step(im_q[part], im_k[part], step, j, aug_k)
                share = loss * (size / b)
                if not last:
                    backward(share)
            keys.append(stats.pop("k"))
            done.append((share.detach(), {name: v * (size / b) for name, v in stats.items()}))
            start += size
        self.queue.enqueue(torch.cat(keys) if len(keys) > 1 else keys[0], step)
        loss = share + sum(d[0] for d in done[:-1]) if len(done) > 1 else share
        return loss, {name: sum(d[1][name] for d in done) for name in done[0][1]}

    def micro_step(self, im_q, im_k, step, j=0, aug_k=None):
        """Queries, keys (momentum update first, when j == 0) and the sharded InfoNCE of one
        micro-batch against the queue; its keys come back in the stats as "k"."""
        if self.split_bn:
            n = im_q.shape[0]
            S = max(s for s in range(1, min(self.bn_splits, n) + 1) if n % s == 0)
            set_bn_splits(self.encoder_q, S)
            set_bn_splits(self.encoder_k, S)

        fmt, device_type = memory_format(self.channels_last), im_q.device.type
        with autocast(self.precision, device_type):
            q = self.encoder_q(im_q.contiguous(memory_format=fmt))
        q = F.normalize(q.float(), dim=1)

        with torch.no_grad():
            if j == 0:
                self.momentum_update(self.m)
            if self.bn != "sync":   # micro-batch j: its own permutation (seed + j)
                im_k, ctx = shuffle(im_k, self.seed + j, step, self.group, local=self.split_bn)
            if aug_k is not None:
                im_k = aug_k(im_k)
            with autocast(self.precision, device_type):
                k = self.encoder_k(im_k.contiguous(memory_format=fmt))
            k = F.normalize(k.float(), dim=1)
            if self.bn != "sync":
                k = unshuffle(k, ctx)

        loss, stats = sharded_info_nce(q, k, self.queue.keys, self.T, self.group)
        return loss, dict(stats, k=k)


def no_sync(encoder):
    """DDP's no_sync() for a DistributedDataParallel encoder (no gradient all-reduce in its
    backward), nothing for a plain module."""
    return encoder.no_sync() if isinstance(encoder, DistributedDataParallel) else contextlib.nullcontext()


def micro_batches(b, max_batch):
    """The sizes of the micro-batches a local batch of b images is taken in: as few as keep each
    <= max_batch, as equal as possible (they differ by at most one; 0 = no limit: [b]). At W=4
    after a shrink from 16, B=4096: b=1024, max_batch 256 -> 4 micro-batches of 256."""
    if not max_batch or b <= max_batch:
        return [b]
    n = -(-b // max_batch)
    return [b // n + (i < b % n) for i in range(n)]
