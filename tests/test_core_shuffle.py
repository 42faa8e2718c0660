"""Shuffled BN: the all_to_all shuffle and its inverse, and split-BN."""
import pytest
import torch
import torch.nn as nn
import torchvision
from torch.testing import assert_close

from dist_utils import run_gloo
from moco_ray.collectives import all_gather
from moco_ray.model import SplitBatchNorm, build_encoder, set_bn_splits
from moco_ray.shuffle import shuffle, unshuffle


def _shuffle_round_trip(rank, W, b=6):
    ids = torch.arange(rank * b, (rank + 1) * b)  # global sample ids of this worker
    x = torch.randn(b, 3, 4, 4, dtype=torch.float64)
    x[:, 0, 0, 0] = ids.double()
    xs, ctx = shuffle(x, seed=0, step=5)
    got = xs[:, 0, 0, 0].long()

    assert xs.shape == x.shape
    assert torch.equal(got, ctx["perm"][rank * b:(rank + 1) * b])  # position p holds sample perm[p]
    assert ((got // b) != rank).any(), "the key batch should hold other workers' samples"
    assert torch.equal(unshuffle(xs, ctx), x)  # exactly, bit for bit
    # features come back to their owners too (any width, any dtype)
    feats = xs[:, :, 0, 0].float() * 2
    assert torch.equal(unshuffle(feats, ctx), x[:, :, 0, 0].float() * 2)

    # every worker drew the same permutation (nothing was broadcast); another step draws another
    perms = all_gather(ctx["perm"][None])
    assert all(torch.equal(p, ctx["perm"]) for p in perms)
    assert not torch.equal(shuffle(x, seed=0, step=6)[1]["perm"], ctx["perm"])
    assert not torch.equal(shuffle(x, seed=1, step=5)[1]["perm"], ctx["perm"])

    # the global shuffled batch is a permutation of the global batch: each sample exactly once
    all_got = all_gather(got)
    assert sorted(all_got.tolist()) == list(range(W * b))
    return got


@pytest.mark.parametrize("W", [2, 3])
def test_unshuffle_inverts_shuffle_across_workers(W):
    got = run_gloo(_shuffle_round_trip, W)
    assert all(((g // 6) != r).any() for r, g in enumerate(got))


def test_single_worker_shuffle_is_local():
    x = torch.arange(8.0)[:, None]
    xs, ctx = shuffle(x, seed=0, step=3)
    assert not torch.equal(xs, x) and sorted(xs[:, 0].tolist()) == x[:, 0].tolist()
    assert torch.equal(unshuffle(xs, ctx), x)


def manual_group_bn(x, bn, S):
    out = torch.empty_like(x)
    for s in range(S):  # split s holds samples s, s + S, s + 2S, ...
        xs = x[s::S]
        mean, var = xs.mean(dim=(0, 2, 3), keepdim=True), xs.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        out[s::S] = (xs - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] \
            + bn.bias[None, :, None, None]
    return out


def test_split_bn_train_mode_is_per_group_bn_and_eval_mode_is_plain_bn():
    torch.manual_seed(0)
    C, S, N = 5, 4, 12
    bn = SplitBatchNorm(C, num_splits=S)
    nn.init.normal_(bn.weight), nn.init.normal_(bn.bias)
    x = torch.randn(N, C, 3, 3) * 3 + 1
    assert_close(bn(x), manual_group_bn(x, bn, S), atol=1e-5, rtol=1e-5)

    # running stats: the average over the splits of BN's momentum update
    means = torch.stack([x[s::S].mean(dim=(0, 2, 3)) for s in range(S)])
    varis = torch.stack([x[s::S].var(dim=(0, 2, 3), unbiased=True) for s in range(S)])
    assert_close(bn.running_mean, 0.1 * means.mean(0))
    assert_close(bn.running_var, 0.9 + 0.1 * varis.mean(0))
    assert int(bn.num_batches_tracked) == 1

    plain = nn.BatchNorm2d(C)
    assert set(plain.state_dict()) == set(bn.state_dict())
    plain.load_state_dict(bn.state_dict())
    bn.eval(), plain.eval()
    assert torch.equal(bn(x), plain(x))

    with pytest.raises(ValueError, match="divisible"):
        SplitBatchNorm(C, num_splits=5).train()(x)


def test_split_bn_splits_are_set_at_run_time_and_one_split_is_torchvision():
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 16, mlp=False, small_stem=True, num_splits=4)
    reference = torchvision.models.resnet18(num_classes=16)
    reference.conv1, reference.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    reference.load_state_dict(encoder.state_dict())
    x = torch.randn(8, 3, 8, 8)
    assert not torch.allclose(encoder(x), reference(x), atol=1e-3)
    set_bn_splits(encoder, 1)
    assert {m.num_splits for m in encoder.modules() if isinstance(m, SplitBatchNorm)} == {1}
    assert_close(encoder(x), reference(x))
