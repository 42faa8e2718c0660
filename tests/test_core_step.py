"""One MoCo step end to end: DDP query encoder, momentum key encoder, shuffled BN, sharded queue."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close

from dist_utils import run_gloo
from moco_ray.collectives import all_gather
from moco_ray.model import SplitBatchNorm
from moco_ray.queue import seeded_generator
from moco_ray.step import MoCo


def small_moco(**kw):
    args = dict(arch="resnet18", dim=16, K=32, m=0.9, T=0.2, mlp=True, small_stem=True, seed=7)
    args.update(kw)
    return MoCo(**args)


def expected_keys(encoder_k, im_k, rank, W, seed, step):
    """Keys as the shuffled-BN recipe defines them: the global batch permuted by the (seed, step)
    permutation, each worker's slice through the key encoder in train mode, then un-permuted."""
    b = im_k.shape[0]
    x = all_gather(im_k)
    perm = torch.randperm(W * b, generator=seeded_generator(seed, step))
    k = torch.empty(W * b, encoder_k.fc[-1].out_features)
    with torch.no_grad():
        for w in range(W):
            k[perm[w * b:(w + 1) * b]] = F.normalize(encoder_k(x[perm[w * b:(w + 1) * b]]), dim=1)
    return k[rank * b:(rank + 1) * b]


def _moco_shuffle_step(rank, W, b=4):
    torch.manual_seed(0)
    model = small_moco(bn="shuffle")
    assert not model.split_bn and model.queue.keys.shape == (32 // W, 16)
    model.encoder_q = DistributedDataParallel(model.encoder_q)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(2):
        im_q, im_k = torch.randn(b, 3, 16, 16, generator=g), torch.randn(b, 3, 16, 16, generator=g)
        q0 = [p.detach().clone() for p in model.encoder_q.module.parameters()]
        k0 = [p.detach().clone() for p in model.encoder_k.parameters()]

        loss, stats = model(im_q, im_k, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        assert torch.isfinite(loss) and set(stats) >= {"l_pos", "l_neg", "acc"}
        # the key encoder moved by the momentum rule, before the keys were computed
        for p_q, p_k, p_k0 in zip(q0, model.encoder_k.parameters(), k0):
            assert_close(p_k, 0.9 * p_k0 + 0.1 * p_q)
        assert any(not torch.equal(a, b) for a, b in zip(k0, model.encoder_k.parameters()))
        assert all(p.grad is None for p in model.encoder_k.parameters())
        # the query encoder learned, identically on every rank (DDP)
        assert any(not torch.equal(a, b) for a, b in zip(q0, model.encoder_q.module.parameters()))
        flat = torch.cat([p.detach().flatten() for p in model.encoder_q.module.parameters()])
        assert all(torch.equal(f, flat) for f in all_gather(flat[None]))
        # this worker enqueued the keys of its own samples, computed with shuffled BN
        written = model.queue.steps == step
        assert int(written.sum()) == b
        assert_close(model.queue.keys[written],
                     expected_keys(copy.deepcopy(model.encoder_k), im_k, rank, W, model.seed, step),
                     atol=1e-5, rtol=1e-5)

    # the shards stay different on every rank: DDP broadcast nothing into them
    assert not any(k.startswith("queue") for k in model.state_dict())
    shards = all_gather(model.queue.keys[None])
    assert not torch.equal(shards[0], shards[1])
    return loss.item()


def test_moco_step_with_shuffled_bn_over_two_workers():
    losses = run_gloo(_moco_shuffle_step, 2)
    assert losses[0] != losses[1]


def _sync_bn_on_cpu(rank, W):
    model = small_moco(bn="sync")
    with pytest.raises(ValueError, match="GPU"):
        model(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), 0)


def test_sync_bn_on_cpu_fails_clearly():
    run_gloo(_sync_bn_on_cpu, 2)


def test_single_worker_shuffle_falls_back_to_split_bn():
    torch.manual_seed(0)
    model = small_moco(bn="shuffle", bn_splits=4)
    assert model.split_bn and model.queue.keys.shape == (32, 16)
    loss, stats = model(torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16), 0)  # 4 clamped to 3
    loss.backward()
    splits = {m.num_splits for enc in (model.encoder_q, model.encoder_k)
              for m in enc.modules() if isinstance(m, SplitBatchNorm)}
    assert splits == {3}
    assert int((model.queue.steps == 0).sum()) == 6 and model.queue.ptr == 6
    with pytest.raises(ValueError, match="bn"):
        small_moco(bn="group")
