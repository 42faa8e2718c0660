"""One MoCo step on one worker (Algorithm 1 of the paper), with a sharded queue and shuffled BN."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

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
                 precision="fp32", channels_last=False):
        super().__init__()
        if bn not in ("shuffle", "sync", "split"):
            raise ValueError(f"bn must be shuffle, sync or split, got {bn!r}")
        self.K, self.m, self.T, self.bn, self.bn_splits, self.seed = K, m, T, bn, bn_splits, seed
        self.group = group
        self.precision, self.channels_last = precision, channels_last
        self.rank, self.world_size = world(group)
        self.split_bn = bn == "split" or (bn == "shuffle" and self.world_size == 1)

        self.encoder_q = build_encoder(arch, dim, mlp, small_stem, head_bn=head_bn)
        if bn == "sync":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q, group)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False

        self.momentum_update = MomentumUpdate(self.encoder_q, self.encoder_k)
        self.queue = KeyQueue(K, dim, self.rank, self.world_size, seed)

    def forward(self, im_q, im_k, step):
        """Loss of the local queries (DDP averages the gradients) and detached stats."""
        if self.queue.keys.device != im_q.device:
            self.queue.to(im_q.device)
        if self.bn == "sync" and self.world_size > 1 and im_q.device.type == "cpu":
            raise ValueError("bn=sync needs GPUs (torch's SyncBatchNorm); use bn=shuffle on CPU")
        if self.split_bn:
            S = max(s for s in range(1, min(self.bn_splits, im_q.shape[0]) + 1) if im_q.shape[0] % s == 0)
            set_bn_splits(self.encoder_q, S)
            set_bn_splits(self.encoder_k, S)

        fmt, device_type = memory_format(self.channels_last), im_q.device.type
        with autocast(self.precision, device_type):
            q = self.encoder_q(im_q.contiguous(memory_format=fmt))
        q = F.normalize(q.float(), dim=1)

        with torch.no_grad():
            self.momentum_update(self.m)
            if self.bn != "sync":
                im_k, ctx = shuffle(im_k, self.seed, step, self.group, local=self.split_bn)
            with autocast(self.precision, device_type):
                k = self.encoder_k(im_k.contiguous(memory_format=fmt))
            k = F.normalize(k.float(), dim=1)
            if self.bn != "sync":
                k = unshuffle(k, ctx)

        loss, stats = sharded_info_nce(q, k, self.queue.keys, self.T, self.group)

        self.queue.enqueue(k, step)
        return loss, stats
