"""The sharded InfoNCE equals the paper's replicated-queue InfoNCE: loss and DDP-averaged gradients."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close

from dist_utils import run_gloo
from moco_ray.collectives import all_gather, all_to_all
from moco_ray.loss import sharded_info_nce
from moco_ray.queue import shard_size

TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_encoder(dim):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, dim))


def reference_info_nce(q, k, queue, T):
    """MoCo as in the paper: one replicated queue (K x D), label 0 is the positive."""
    l_pos = torch.einsum("nc,nc->n", q, k)[:, None]
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    labels = torch.zeros(q.shape[0], dtype=torch.long)
    acc = (l_pos[:, 0] > l_neg.max(dim=1).values).float().mean()
    return F.cross_entropy(logits, labels), acc


def _equivalence(rank, W, b=4, D=16, K=50, T=0.07):
    torch.manual_seed(0)  # same initial weights on every rank
    encoder = tiny_encoder(D)
    reference = copy.deepcopy(encoder)
    ddp = DistributedDataParallel(encoder) if dist.is_initialized() else encoder

    g = torch.Generator().manual_seed(1)  # the same global batch and queue on every rank
    x = torch.randn(W * b, 3, 6, 6, generator=g)
    k = F.normalize(torch.randn(W * b, D, generator=g), dim=1)
    queue = F.normalize(torch.randn(K, D, generator=g), dim=1)
    starts = [sum(shard_size(K, W, s) for s in range(r)) for r in range(W + 1)]
    shard = queue[starts[rank]:starts[rank + 1]]  # the reference queue is the concatenation
    mine = slice(rank * b, (rank + 1) * b)

    q = F.normalize(ddp(x[mine]), dim=1)
    loss, stats = sharded_info_nce(q, k[mine], shard, T)
    loss.backward()

    # reference: every rank's loss on its own slice, gradients averaged over ranks as DDP does
    losses, accs = zip(*[reference_info_nce(F.normalize(reference(x[r * b:(r + 1) * b]), dim=1),
                                            k[r * b:(r + 1) * b], queue, T) for r in range(W)])
    (sum(losses) / W).backward()

    assert_close(loss.detach(), losses[rank].detach(), **TOL)
    assert_close(stats["acc"], accs[rank])
    for (name, p), p_ref in zip(encoder.named_parameters(), reference.parameters()):
        assert p.grad.abs().max() > 0, name
        assert_close(p.grad, p_ref.grad, **TOL, msg=name)
    return loss.item()


@pytest.mark.parametrize("W", [1, 2, 3])
def test_sharded_info_nce_equals_replicated_reference(W):
    losses = run_gloo(_equivalence, W)
    assert len(set(losses)) == W or W == 1  # different local queries, different local losses


def test_without_process_group_is_cross_entropy():
    assert _equivalence(0, 1) > 0


def _collective_grads(rank, W):
    # all_gather: y = cat_s x_s; L = sum_s <c_s, y> on every rank s, so dL/dx_r = sum_s c_s[slice r]
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    c = torch.arange(2 * W * 3, dtype=torch.float).view(2 * W, 3) * (rank + 1)
    y = all_gather(x)
    assert_close(y.detach(), torch.cat([torch.full((2, 3), float(s + 1)) for s in range(W)]))
    (y * c).sum().backward()
    expected = sum(torch.arange(2 * W * 3, dtype=torch.float).view(2 * W, 3)[2 * rank:2 * rank + 2] * (s + 1)
                   for s in range(W))
    assert_close(x.grad, expected)

    # all_to_all with uneven splits: rank r sends r + s + 1 rows to rank s
    in_splits = [rank + s + 1 for s in range(W)]
    out_splits = [s + rank + 1 for s in range(W)]
    x = (torch.arange(sum(in_splits), dtype=torch.float) + 100 * rank)[:, None].requires_grad_()
    y = all_to_all(x, out_splits, in_splits)
    expected = torch.cat([torch.arange(n, dtype=torch.float) + sum(s + t + 1 for t in range(rank)) + 100 * s
                          for s, n in enumerate(out_splits)])
    assert_close(y[:, 0].detach(), expected)
    sources = torch.cat([torch.full((n,), s) for s, n in enumerate(out_splits)])
    (y[:, 0] * (10 * (rank + 1) + sources + 1)).sum().backward()
    receivers = torch.cat([torch.full((n,), s) for s, n in enumerate(in_splits)])
    assert_close(x.grad[:, 0], (10 * (receivers + 1) + rank + 1).float())


@pytest.mark.parametrize("W", [3])
def test_collectives_gradients(W):
    run_gloo(_collective_grads, W)


def _equivalence_on_older_torch(rank, W):
    # torch < 2.14 has no all_gather_single / reduce_scatter_single: hide them in this process
    for name in ("all_gather_single", "reduce_scatter_single"):
        if hasattr(dist, name):
            delattr(dist, name)
    assert not hasattr(dist, "all_gather_single")
    return _equivalence(rank, W)


def test_sharded_info_nce_without_the_torch_2_14_collectives():
    """The lent GPU machines run torch 2.11: the collectives fall back to all_gather_into_tensor and
    reduce_scatter_tensor, with the same loss and gradients (the gradient goes through the
    reduce-scatter)."""
    losses = run_gloo(_equivalence_on_older_torch, 2)
    assert losses == run_gloo(_equivalence, 2)
