"""The symmetric MoCo steps: MoCo v2+ (v2 with the symmetric loss, sharded queue) and MoCo v3
(predictor, global-batch keys, no queue), with the interface of moco_ray.step.MoCo:
model(im_q, im_k, step) -> (loss, stats), attributes encoder_q (DDP-wrappable), encoder_k, queue
(None for v3) and m (set before each step by the momentum schedule).

Both views go through both encoders with BN statistics per view, as in the references, and each
direction's loss is computed against the other view's keys. v3 puts the two views through an encoder
in one pass where that gives the same outputs (every BN split, see MoCoV3.fuse_views).
"""
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .collectives import world
from .encoders import build_v3_encoders
from .loss import sharded_info_nce
from .loss_v3 import global_batch_info_nce
from .model import MomentumUpdate, SplitBatchNorm, set_bn_splits
from .precision import autocast, memory_format
from .shuffle import shuffle, unshuffle
from .step import MoCo


def usable_splits(batch, bn_splits):
    """The largest number of split-BN sub-batches <= bn_splits that divides the batch."""
    return max(s for s in range(1, min(bn_splits, batch) + 1) if batch % s == 0)


def embed(encoder, x, precision, channels_last):
    """normalize(encoder(x)) in fp32, the encoder under autocast."""
    with autocast(precision, x.device.type):
        out = encoder(x.contiguous(memory_format=memory_format(channels_last)) if x.dim() == 4 else x)
    return F.normalize(out.float(), dim=1)


def interleave(a, b):
    """[a0, b0, a1, b1, ...]: in 2S BN splits (sample j in split j % 2S) a_j falls in split 2(j % S)
    and b_j in split 2(j % S) + 1, so each split holds the images of one view's split of S, and a
    pass over the 2b images normalises exactly as one pass per view. Memory: one copy of both views."""
    return torch.stack([a, b], dim=1).flatten(0, 1)


def only_split_bn(module):
    """True when every batch norm of module is a SplitBatchNorm: its sub-batches never mix images, and
    the rest (convolutions, LayerNorm, attention, MLPs) treats each image on its own."""
    return all(isinstance(m, SplitBatchNorm) for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))


def mean_stats(a, b):
    return {key: (a[key] + b[key]) / 2 for key in a}


def check_sync_bn(bn, x):
    """torch's SyncBatchNorm refuses CPU tensors whenever a process group exists, even of one worker."""
    if bn == "sync" and x.device.type == "cpu" and dist.is_available() and dist.is_initialized():
        raise ValueError("bn=sync needs GPUs (torch's SyncBatchNorm); use bn=split on CPU")


class MoCoV2Plus(MoCo):
    """MoCo v2 with the symmetric loss (the authors' CIFAR demo, solo-learn's mocov2plus): the loss
    is the mean of loss(q1, k2) and loss(q2, k1), both against the same sharded queue, and both
    views' keys (2b per worker) are enqueued, view 1's first. The mean keeps v2's gradient scale
    (the demo sums the two, which is v2's lr doubled). Each view's keys get their own BN shuffle,
    drawn from the (seed, 2*step + view) stream.

    encoder: a query encoder (its `fc` the head) to use instead of arch's (tests use a tiny one)."""

    def __init__(self, *args, encoder=None, **kwargs):
        super().__init__(*args, **kwargs)
        if encoder is not None:
            self.encoder_q, self.encoder_k = encoder, copy.deepcopy(encoder)
            for param_k in self.encoder_k.parameters():
                param_k.requires_grad = False
            self.momentum_update = MomentumUpdate(self.encoder_q, self.encoder_k)

    def forward(self, im_q, im_k, step):
        if self.queue.keys.device != im_q.device:
            self.queue.to(im_q.device)
        check_sync_bn(self.bn, im_q)
        if self.split_bn:
            for encoder in (self.encoder_q, self.encoder_k):
                set_bn_splits(encoder, usable_splits(im_q.shape[0], self.bn_splits))

        q1, q2 = (embed(self.encoder_q, x, self.precision, self.channels_last) for x in (im_q, im_k))
        with torch.no_grad():
            self.momentum_update(self.m)
            k1, k2 = (self.keys(x, 2 * step + view) for view, x in enumerate((im_q, im_k)))

        loss_12, stats_12 = sharded_info_nce(q1, k2, self.queue.keys, self.T, self.group)
        loss_21, stats_21 = sharded_info_nce(q2, k1, self.queue.keys, self.T, self.group)
        self.queue.enqueue(torch.cat([k1, k2]), step)
        return (loss_12 + loss_21) / 2, mean_stats(stats_12, stats_21)

    @torch.no_grad()
    def keys(self, im, stream):
        """Keys of one view through the momentum encoder, with shuffled (or split) BN."""
        if self.bn == "sync":
            return embed(self.encoder_k, im, self.precision, self.channels_last)
        im, ctx = shuffle(im, self.seed, stream, self.group, local=self.split_bn)
        return unshuffle(embed(self.encoder_k, im, self.precision, self.channels_last), ctx)


class QueryEncoder(nn.Module):
    """MoCo v3's query path: the base encoder (backbone + projector, its `fc`) and the predictor."""

    def __init__(self, base, predictor):
        super().__init__()
        self.base, self.predictor = base, predictor

    def forward(self, x):
        return self.predictor(self.base(x))


class MoCoV3(nn.Module):
    """MoCo v3 (Chen, Xie, He 2021): query = backbone + projector + predictor, momentum encoder =
    backbone + projector, loss = ctr(q1, k2) + ctr(q2, k1) with each query against the keys of the
    global batch (moco_ray.loss_v3), no queue.

    bn: "sync" (SyncBatchNorm in every BN, the paper's; torch supports it on GPU only), "split"
    (each worker normalises its own batch, in bn_splits sub-batches; split applies to torchvision
    ResNets and the MLPs) or "shuffle" (split, the keys' pairs first dealt across workers: see
    keys). The momentum encoder updates (with self.m) before it computes the keys.
    Build it after init_process_group; encoder_q may then be wrapped by DistributedDataParallel.
    encoders: a (base encoder, predictor) pair to use instead of arch's (moco_ray.encoders).

    fuse_views: with bn=split or shuffle and no BN but SplitBatchNorm in the encoders, both views go through
    each encoder in one pass of 2b images in 2S splits, interleaved (see interleave): the same
    outputs and gradients as a pass per view, in one larger kernel per layer (at the demo's size the
    whole step is 10% faster on one CPU thread and 20% on two: bench/methods.py). The BN running
    statistics (used only for evaluation) then move once per step, towards the mean of both views,
    instead of once per view. Off where a BN would mix the views (SyncBN, a timm model's own BN).
    """

    queue = None   # no queue: nothing per worker to checkpoint beyond the model

    def __init__(self, arch="resnet50", dim=256, mlp_dim=4096, m=0.99, T=1.0, res=224, small_stem=False,
                 bn="sync", bn_splits=1, stop_grad_conv1=False, group=None, precision="fp32",
                 channels_last=False, encoders=None, width=64, seed=0):
        super().__init__()
        if bn not in ("sync", "split", "shuffle"):
            raise ValueError(f"MoCo v3 normalises with bn=sync, split or shuffle, got {bn!r}")
        self.m, self.T, self.bn, self.bn_splits, self.group, self.seed = m, T, bn, bn_splits, group, seed
        self.precision, self.channels_last = precision, channels_last
        self.rank, self.world_size = world(group)
        if encoders is None:
            encoders = build_v3_encoders(arch, dim, mlp_dim, res, small_stem, stop_grad_conv1=stop_grad_conv1,
                                         width=width)
        self.encoder_q = QueryEncoder(*encoders)
        if bn == "sync":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q, group)
        self.encoder_k = copy.deepcopy(self.encoder_q.base)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False
        self.momentum_update = MomentumUpdate(self.encoder_q.base, self.encoder_k)
        self.fuse_views = bn != "sync" and only_split_bn(self.encoder_q)

    @property
    def base_encoder(self):
        """Backbone + projector of the query path (its `fc` is the projector), unwrapped from DDP."""
        return getattr(self.encoder_q, "module", self.encoder_q).base

    def forward(self, im_q, im_k, step):
        """The symmetric loss of the local batch (DDP averages the gradients) and detached stats.
        step seeds bn=shuffle's permutation (no queue)."""
        check_sync_bn(self.bn, im_q)
        if self.bn != "sync":
            self.set_splits(im_q.shape[0])
        q1, q2 = self.both_views(self.encoder_q, im_q, im_k)
        with torch.no_grad():
            self.momentum_update(self.m)
            k1, k2 = self.keys(im_q, im_k, step)
        loss_12, stats_12 = global_batch_info_nce(q1, k2, self.T, self.group)
        loss_21, stats_21 = global_batch_info_nce(q2, k1, self.T, self.group)
        return loss_12 + loss_21, mean_stats(stats_12, stats_21)

    def set_splits(self, batch):
        """Per-worker BN (split, shuffle): usable_splits(batch, bn_splits) sub-batches per view in
        both encoders, twice as many where both views go in one pass."""
        splits = usable_splits(batch, self.bn_splits) * (2 if self.fuse_views else 1)
        for encoder in (self.encoder_q, self.encoder_k):
            set_bn_splits(encoder, splits)

    def keys(self, im_1, im_2, step):
        """Both views' keys through the momentum encoder. bn=shuffle: the pairs of the global batch are
        first dealt to the workers by one permutation drawn from (seed, step) (moco_ray.shuffle: an
        all_to_all of 2b images each way), so the BN sub-batch a key is normalised in is a random
        draw from the global batch, unrelated to its query's."""
        if self.bn != "shuffle":
            return self.both_views(self.encoder_k, im_1, im_2)
        pairs, ctx = shuffle(torch.stack([im_1, im_2], dim=1), self.seed, step, self.group)
        keys = unshuffle(torch.stack(self.both_views(self.encoder_k, pairs[:, 0], pairs[:, 1]), dim=1), ctx)
        return keys[:, 0], keys[:, 1]

    def both_views(self, encoder, im_q, im_k):
        """normalize(encoder(view)) of each view: one pass over both where fuse_views, else one per view."""
        if not self.fuse_views:
            return tuple(embed(encoder, x, self.precision, self.channels_last) for x in (im_q, im_k))
        out = embed(encoder, interleave(im_q, im_k), self.precision, self.channels_last)
        return out[0::2], out[1::2]
