"""A step taken in micro-batches is the step taken at once (the same queue, loss, gradients and
key encoder), and uint8 key views shuffled before their augmentation give the keys of float views."""
import copy

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close

from dist_utils import run_gloo
from moco_ray.augment import augment
from moco_ray.shuffle import shuffle
from moco_ray.step import micro_batches
from test_core_step import small_moco


def test_micro_batches_are_as_equal_as_possible():
    assert micro_batches(7, 0) == [7] and micro_batches(7, 7) == [7] and micro_batches(7, 3) == [3, 2, 2]
    assert micro_batches(1024, 256) == [256] * 4 and micro_batches(1365, 512) == [455] * 3
    for b in range(1, 60):
        for limit in range(1, 12):
            sizes = micro_batches(b, limit)
            assert sum(sizes) == b and max(sizes) <= max(limit, 1) and max(sizes) - min(sizes) <= 1
            assert len(sizes) == -(-b // limit)


def _sgd_step(model, optimizer, im_q, im_k, step, micro):
    optimizer.zero_grad(set_to_none=True)
    loss, stats = model(im_q, im_k, step, micro=micro, backward=lambda part: part.backward())
    loss.backward()
    optimizer.step()
    return loss.detach(), stats


def _micro_equals_one_batch(rank, W, b=7, limit=3):
    """BN in eval mode (running statistics): the one thing micro-batches change, the batch
    statistics, is out, so the two steps must agree to fp32 tolerance."""
    torch.manual_seed(0)
    whole = small_moco(bn="shuffle").eval()
    micro = copy.deepcopy(whole)
    optimizers = []
    for model in (whole, micro):
        model.encoder_q = DistributedDataParallel(model.encoder_q)
        optimizers.append(torch.optim.SGD(model.encoder_q.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4))
    g = torch.Generator().manual_seed(100 + rank)
    sizes = micro_batches(b, limit)
    assert sizes == [3, 2, 2]
    for step in range(3):   # later steps score against the keys the earlier ones enqueued
        im_q, im_k = torch.randn(b, 3, 16, 16, generator=g), torch.randn(b, 3, 16, 16, generator=g)
        loss_w, stats_w = _sgd_step(whole, optimizers[0], im_q, im_k, step, None)
        loss_m, stats_m = _sgd_step(micro, optimizers[1], im_q, im_k, step, sizes)
        assert_close(loss_m, loss_w, rtol=1e-5, atol=1e-6)
        for name in ("l_pos", "l_neg", "acc"):
            assert_close(stats_m[name], stats_w[name], rtol=1e-5, atol=1e-6)
        for a, c in zip(micro.encoder_q.module.parameters(), whole.encoder_q.module.parameters()):
            assert_close(a, c, rtol=1e-5, atol=1e-6)
        for a, c in zip(micro.encoder_k.parameters(), whole.encoder_k.parameters()):
            assert_close(a, c, rtol=1e-5, atol=1e-6)   # one momentum update per step, not three
        assert_close(micro.queue.keys, whole.queue.keys, rtol=1e-5, atol=1e-6)
        assert torch.equal(micro.queue.steps, whole.queue.steps) and micro.queue.ptr == whole.queue.ptr
    return float(loss_m)


@pytest.mark.parametrize("W", [1, 2])
def test_a_step_in_micro_batches_is_the_step_at_once(W):
    losses = run_gloo(_micro_equals_one_batch, W)
    assert len(set(losses)) == W   # each rank's own queries


def test_micro_batches_need_a_backward():
    model = small_moco()
    with pytest.raises(ValueError, match="backward"):
        model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), 0, micro=[2, 2])


def _raw_keys_equal_float_keys(rank, W, b=6):
    """Train-mode shuffled BN: the uint8 views, shuffled and then normalised on the receiving
    worker, give the keys (and loss) of the normalised float views shuffled as before."""
    torch.manual_seed(0)
    as_float = small_moco(bn="shuffle")
    as_uint8 = copy.deepcopy(as_float)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(2):
        im_q = torch.randn(b, 3, 16, 16, generator=g)
        raw = torch.randint(0, 256, (b, 3, 16, 16), generator=g, dtype=torch.uint8)
        loss_f, _ = as_float(im_q, augment(raw, None), step)
        loss_u, _ = as_uint8(im_q, raw, step, aug_k=lambda x: augment(x, None))
        assert_close(loss_u, loss_f)
        assert torch.equal(as_uint8.queue.keys, as_float.queue.keys)
    moved, _ = shuffle(raw, as_uint8.seed, 0)
    assert moved.dtype == torch.uint8   # what the all_to_all carries: 1 byte per pixel
    return float(loss_u)


@pytest.mark.parametrize("W", [1, 2])
def test_uint8_key_views_shuffled_before_augmentation_give_the_same_keys(W):
    run_gloo(_raw_keys_equal_float_keys, W)
