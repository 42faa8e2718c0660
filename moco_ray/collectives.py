"""The only place that calls torch.distributed collectives for the MoCo core.

`all_gather` and `all_to_all` are autograd-aware. They are written here on top of the plain
c10d ops (all_gather_single, reduce_scatter_single, all_to_all_single, all of which run on gloo
and nccl) instead of the deprecated torch.distributed.nn.functional, whose gloo backward
emulates reduce-scatter with W scatters. all_gather_single and reduce_scatter_single are torch
2.14's names; earlier releases (2.11 on the lent GPU machines) have the same ops as
all_gather_into_tensor and reduce_scatter_tensor, which `_c10d` picks.
"""
import torch
import torch.distributed as dist


def world(group=None):
    """(rank, world size) in `group`; (0, 1) when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _c10d(name, fallback):
    """torch.distributed's `name`, or `fallback` (same arguments) on a torch without it. Looked up
    at each call, so that what the running torch offers decides."""
    return getattr(dist, name, None) or getattr(dist, fallback)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        _, W = world(group)
        out = x.new_empty((W * x.shape[0],) + tuple(x.shape[1:]))
        _c10d("all_gather_single", "all_gather_into_tensor")(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # every rank used every slice: the gradient of a rank's input is the sum over ranks
        _, W = world(ctx.group)
        gx = grad.new_empty((grad.shape[0] // W,) + tuple(grad.shape[1:]))
        _c10d("reduce_scatter_single", "reduce_scatter_tensor")(gx, grad.contiguous(), group=ctx.group)
        return gx, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        gx = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(gx, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return gx, None, None, None


def all_gather(x, group=None):
    """Concatenate x (same shape on every rank) along dim 0 in rank order, with autograd."""
    if world(group)[1] == 1:
        return x
    return _AllGather.apply(x, group)


def all_to_all(x, out_splits, in_splits, group=None):
    """all_to_all_single along dim 0 with (possibly uneven) split sizes, with autograd."""
    if world(group)[1] == 1:
        return x
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)
