"""MoCo v3 and v2+ steps under DDP over gloo equal references written from the papers, W = 1, 2, 3.

Each rank runs the distributed step on its slice and, next to it, the reference on the whole global
batch (the same initial weights, data and optimizer): each worker's slice goes through the encoders
on its own, as BN normalises per worker (bn=split with one split), and the reference's loss is the
paper's over the global batch."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dist_utils import run_gloo
from moco_ray.collectives import all_gather
from moco_ray.encoders import Encoder, mlp
from moco_ray.model import SplitBatchNorm, momentum_update
from moco_ray.queue import seeded_generator
from moco_ray.step_v3 import MoCoV2Plus, MoCoV3

TOL = 1e-5


def tiny_v3_encoders(dim=8, mlp_dim=16, norm=nn.BatchNorm2d):
    """A conv-BN-ReLU-pool backbone with moco-v3's projector (2 layers) and predictor (v2+ uses the
    first as its encoder: an MLP head with BN). norm=SplitBatchNorm: every BN split, so MoCoV3 puts
    both views through an encoder in one pass."""
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Encoder(backbone, mlp(2, 8, mlp_dim, dim)), mlp(2, dim, mlp_dim, dim, last_bn=False)


def views(step, W, b, res=8):
    """Both views of the global batch of `step`, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(W * b, 3, res, res, generator=g), torch.randn(W * b, 3, res, res, generator=g)


def per_worker(encoder, x, W):
    """normalize(encoder(x)) with each worker's slice of the global batch encoded on its own."""
    return torch.cat([F.normalize(encoder(part), dim=1) for part in x.chunk(W)])


def ctr(q, k, T):
    """Algorithm 1 of MoCo v3: logits of the N x N pairs, labels range(N), scaled by 2T."""
    return F.cross_entropy(q @ k.t() / T, torch.arange(q.shape[0])) * (2 * T)


def reference_v3_step(ref_q, ref_k, x1, x2, W, m, T, perm=None):
    """ref_q: base encoder + predictor (QueryEncoder), ref_k: momentum encoder. perm: shuffled BN's
    permutation of the global batch's pairs for the keys (both views alike); None: no shuffle."""
    q1, q2 = per_worker(ref_q, x1, W), per_worker(ref_q, x2, W)
    momentum_update(ref_q.base, ref_k, m)                # before the keys, as the code
    with torch.no_grad():
        perm = torch.arange(x1.shape[0]) if perm is None else perm
        k1, k2 = shuffled_keys(ref_k, x1, W, perm), shuffled_keys(ref_k, x2, W, perm)
    return ctr(q1, k2, T) + ctr(q2, k1, T)


def info_nce(q, k, queue, T):
    """MoCo v1/v2's loss with one replicated queue: label 0 is the positive."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / T
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def shuffled_keys(encoder_k, x, W, perm):
    """Shuffled BN's keys: worker w encodes the images at positions perm[w*b:(w+1)*b] of the global
    batch; each key goes back to its image's position."""
    keys = torch.cat([F.normalize(encoder_k(x[slots]), dim=1) for slots in perm.chunk(W)])
    return keys[torch.argsort(perm)]


def reference_v2plus_step(ref_q, ref_k, queue, x1, x2, W, m, T, perms):
    """The symmetric v2 loss against the replicated queue; returns (loss, queue after the enqueue).
    queue is oldest first: the enqueue drops the 2*B oldest keys and appends k1 and k2. perms: each
    view's BN shuffle of the global batch."""
    q1, q2 = per_worker(ref_q, x1, W), per_worker(ref_q, x2, W)
    momentum_update(ref_q, ref_k, m)
    with torch.no_grad():
        k1, k2 = shuffled_keys(ref_k, x1, W, perms[0]), shuffled_keys(ref_k, x2, W, perms[1])
    loss = (info_nce(q1, k2, queue, T) + info_nce(q2, k1, queue, T)) / 2
    return loss, torch.cat([queue[2 * k1.shape[0]:], k1, k2])


def max_diff(params, ref_params):
    return max((a.detach() - b.detach()).abs().max().item() for a, b in zip(params, ref_params))


def global_mean(x):
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class Unwrapped(nn.Module):  # what DistributedDataParallel looks like without a process group
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def ddp(module):
    return DistributedDataParallel(module) if dist.is_initialized() else Unwrapped(module)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def descend(optimizer, loss):
    """One step of the optimizer on loss."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def count_passes(module):
    """A list that grows by one at each forward of module."""
    passes = []
    module.register_forward_hook(lambda *_: passes.append(1))
    return passes


def _v3_equivalence(rank, W, norm=nn.BatchNorm2d, bn="split", b=4, steps=3, m=0.9, T=0.5):
    """The reference puts each view through each encoder on its own (plain BN, per worker): the step
    must match it whether it fuses the views (norm=SplitBatchNorm) or not (plain BN). bn=shuffle: the
    reference's keys come from the pairs dealt to the workers by the (seed, step) permutation."""
    torch.manual_seed(0)
    model = MoCoV3(m=m, T=T, bn=bn, bn_splits=1, seed=3, encoders=tiny_v3_encoders(norm=norm))
    fused = norm is SplitBatchNorm
    assert model.fuse_views == fused
    ref_q, ref_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    passes = count_passes(model.encoder_k)
    model.encoder_q = ddp(model.encoder_q)
    optimizer, ref_optimizer = sgd(model.encoder_q.parameters()), sgd(ref_q.parameters())
    diffs = []
    for step in range(steps):
        x1, x2 = views(step, W, b)
        loss, stats = model(x1.chunk(W)[rank], x2.chunk(W)[rank], step)
        descend(optimizer, loss)
        perm = torch.randperm(W * b, generator=seeded_generator(3, step)) if bn == "shuffle" else None
        ref_loss = reference_v3_step(ref_q, ref_k, x1, x2, W, m, T, perm)
        descend(ref_optimizer, ref_loss)
        diffs.append(max(abs(global_mean(loss) - ref_loss).item(),
                         max_diff(model.encoder_q.module.parameters(), ref_q.parameters()),
                         max_diff(model.encoder_k.parameters(), ref_k.parameters())))
        assert 0 <= stats["acc"] <= 1 and -1 <= stats["l_neg"] <= 1
    assert len(passes) == (1 if fused else 2) * steps
    assert max(diffs) < TOL, diffs
    # the query path learned (non-trivial comparison) and the predictor is not in the momentum encoder
    assert max_diff(model.encoder_q.module.base.parameters(), copy.deepcopy(model.encoder_k).parameters()) > 1e-3
    assert len(list(model.encoder_k.parameters())) == len(list(model.base_encoder.parameters()))
    return max(diffs)


@pytest.mark.parametrize("W", [1, 2, 3])
def test_v3_step_equals_algorithm_1(W):
    diffs = run_gloo(_v3_equivalence, W)
    print(f"v3 W={W}: max abs diff {max(diffs):.2e}")


@pytest.mark.parametrize("W", [1, 2, 3])
def test_v3_with_both_views_in_one_pass_equals_algorithm_1(W):
    """Split BN everywhere (one split per worker): one pass of both views, interleaved in 2 splits."""
    diffs = run_gloo(_v3_equivalence, W, SplitBatchNorm)
    print(f"v3 fused W={W}: max abs diff {max(diffs):.2e}")


@pytest.mark.parametrize("bn_splits", [2, 4])
def test_one_pass_in_2S_splits_equals_a_pass_per_view_in_S(bn_splits, b=8, steps=3):
    """The demo's case (S = 2 sub-batches per worker): the interleaved pass of 2b images in 2S splits
    trains as one pass per view in S splits. In float64: BN over sub-batches of 2-4 images amplifies
    float32's rounding 10-fold a step (4e-7, 2e-6, 4e-5 at S=2), float64's stays below 1e-11."""
    torch.manual_seed(0)
    fused = MoCoV3(m=0.9, T=0.5, bn="split", bn_splits=bn_splits,
                   encoders=tiny_v3_encoders(norm=SplitBatchNorm)).double()
    per_view = copy.deepcopy(fused)
    per_view.fuse_views = False
    optimizers = sgd(fused.encoder_q.parameters()), sgd(per_view.encoder_q.parameters())
    diffs = []
    for step in range(steps):
        x1, x2 = (x.double() for x in views(step, 1, b))
        losses = [model(x1, x2, step)[0] for model in (fused, per_view)]
        for optimizer, loss in zip(optimizers, losses):
            descend(optimizer, loss)
        diffs.append(max(abs(losses[0] - losses[1]).item(),
                         max_diff(fused.parameters(), per_view.parameters())))
    assert max(diffs) < 1e-10, diffs
    assert max_diff(fused.encoder_q.base.parameters(), fused.encoder_k.parameters()) > 1e-3   # it trained


@pytest.mark.parametrize("W", [1, 2, 3])
def test_v3_with_shuffled_bn_keys_equals_algorithm_1_on_the_shuffled_batch(W):
    """bn=shuffle, in one pass (split BN) and in a pass per view (plain BN): each worker's keys are
    those of the pairs the permutation deals it, then go back to their queries."""
    diffs = [run_gloo(_v3_equivalence, W, norm, "shuffle") for norm in (SplitBatchNorm, nn.BatchNorm2d)]
    print(f"v3 bn=shuffle W={W}: max abs diff, one pass {max(diffs[0]):.2e}, a pass per view {max(diffs[1]):.2e}")


def _v2plus_equivalence(rank, W, bn="split", b=4, K=48, steps=3, m=0.9, T=0.2):
    torch.manual_seed(0)
    model = MoCoV2Plus(arch="resnet18", dim=8, K=K, m=m, T=T, bn=bn, bn_splits=1, seed=3,
                       encoder=tiny_v3_encoders()[0])
    ref_q, ref_k = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    # the replicated queue, oldest first: shard r's slot j is overwritten at the same step on every r
    queue = all_gather(model.queue.keys[None]).transpose(0, 1).reshape(K, -1).clone()
    model.encoder_q = ddp(model.encoder_q)
    optimizer, ref_optimizer = sgd(model.encoder_q.parameters()), sgd(ref_q.parameters())
    diffs = []
    for step in range(steps):
        x1, x2 = views(step, W, b)
        loss, _ = model(x1.chunk(W)[rank], x2.chunk(W)[rank], step)
        descend(optimizer, loss)
        # shuffle: each view's permutation of the (seed, 2*step + view) stream; split: none that
        # matters (one split per worker: BN over the worker's own images in any order)
        perms = [torch.randperm(W * b, generator=seeded_generator(3, 2 * step + view)) if model.bn == "shuffle"
                 and W > 1 else torch.arange(W * b) for view in (0, 1)]
        ref_loss, queue = reference_v2plus_step(ref_q, ref_k, queue, x1, x2, W, m, T, perms)
        descend(ref_optimizer, ref_loss)
        shards = all_gather(model.queue.keys[None]).reshape(K, -1)
        distances = torch.cdist(shards, queue, compute_mode="donot_use_mm_for_euclid_dist")
        same_set = distances.min(dim=1).values.max().item()
        diffs.append(max(abs(global_mean(loss) - ref_loss).item(), same_set,
                         max_diff(model.encoder_q.module.parameters(), ref_q.parameters()),
                         max_diff(model.encoder_k.parameters(), ref_k.parameters())))
        assert int((model.queue.steps == step).sum()) == 2 * b   # both views' keys enqueued
    assert max(diffs) < TOL, diffs
    return max(diffs)


@pytest.mark.parametrize("W, bn", [(1, "split"), (2, "split"), (3, "split"), (2, "shuffle"), (3, "shuffle")])
def test_v2plus_step_equals_replicated_queue_reference(W, bn):
    diffs = run_gloo(_v2plus_equivalence, W, bn)
    print(f"v2+ W={W} bn={bn}: max abs diff {max(diffs):.2e}")


def test_v3_without_process_group_and_bad_bn():
    assert _v3_equivalence(0, 1, steps=1) < TOL
    with pytest.raises(ValueError, match="bn=sync, split or shuffle"):
        MoCoV3(arch="resnet18", bn="global")
