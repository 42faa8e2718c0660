"""The batched augmentations against torchvision's per-image functions, and their randomness."""
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.testing import assert_close

from moco_ray import augment as A

B = 6


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 3, 20, 24, generator=g)
    x[0] = x[0, :1]                    # a grey image: hue and saturation edge cases
    x[1, :, :4] = 1.0                  # saturated pixels
    return x


def per_sample(fn, x, factors):
    return torch.stack([fn(img, float(f)) for img, f in zip(x, factors)])


@pytest.mark.parametrize("name, ours, theirs, lo, hi", [
    ("brightness", A.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    ("contrast", A.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    ("saturation", A.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
    ("hue", A.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_colour_ops_match_torchvision(batch, name, ours, theirs, lo, hi):
    factors = torch.linspace(lo, hi, B)
    assert_close(ours(batch, factors), per_sample(theirs, batch, factors), atol=2e-6, rtol=0)


def test_grayscale_matches_torchvision(batch):
    assert_close(A.grayscale(batch).expand_as(batch), TF.rgb_to_grayscale(batch, num_output_channels=3))


@pytest.mark.parametrize("shape", [(20, 24), (224, 224)])
def test_blur_matches_torchvision(shape):
    x = torch.rand(3, 3, *shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 0.9, 2.0])
    k = A._kernel_size(x)
    assert k % 2 == 1 and (shape[0] < 30 or k == 23)
    ref = torch.stack([TF.gaussian_blur(img, [k, k], [float(s)] * 2) for img, s in zip(x, sigma)])
    assert_close(A.gaussian_blur(x, sigma), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version, view", [("v1", 0), ("v2", 0), ("v3", 0), ("v3", 1)])
def test_augment_draws_per_sample_and_per_call(version, view):
    x = torch.randint(0, 256, (2000, 3, 6, 6), dtype=torch.uint8)
    y1 = A.augment(x, version, torch.Generator().manual_seed(5), view=view)
    y2 = A.augment(x, version, torch.Generator().manual_seed(5), view=view)
    y3 = A.augment(x, version, torch.Generator().manual_seed(6), view=view)
    assert y1.dtype == torch.float32 and y1.shape == x.shape
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert x.dtype == torch.uint8                                   # the input is left alone
    # grey samples (r == g == b after un-normalising): RandomGrayscale p=0.2; the colour jitter
    # keeps grey grey, so it cannot change the share
    rgb = y1 * torch.tensor(A.STD).view(1, 3, 1, 1) + torch.tensor(A.MEAN).view(1, 3, 1, 1)
    grey = ((rgb - rgb.mean(1, keepdim=True)).abs().amax(dim=(1, 2, 3)) < 1e-5).float().mean()
    assert 0.16 < grey < 0.24
    # the jitter moved almost every sample away from its plain normalisation
    plain = A.augment(x, None)
    changed = ((y1 - plain).abs().amax(dim=(1, 2, 3)) > 1e-3).float().mean()
    assert changed > (0.95 if version == "v1" else 0.8)


def test_normalise_only_and_bad_version():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = A.augment(x, None)
    assert_close(y[0, :, 0, 0], (1 - torch.tensor(A.MEAN)) / torch.tensor(A.STD))
    with pytest.raises(ValueError, match="augmentation 'v4'"):
        A.augment(x, "v4")


def test_solarize_matches_torchvision(batch):
    assert_close(A.solarize(batch), TF.solarize(batch, 0.5))
    assert torch.equal(A.random_solarize(batch, 1.0), A.solarize(batch))
    assert torch.equal(A.random_solarize(batch, 0.0), batch)


@pytest.mark.parametrize("view", [0, 1])
def test_v3_views_are_moco_v3s_pair(batch, view):
    """v3 is main_moco.py's augmentation1 (view 0: always blurred, never solarized) and
    augmentation2 (view 1: blurred at p=0.1, solarized at p=0.2), each after the same jitter and
    grayscale: the ops, their parameters and their order, drawn from one generator."""
    blur, solar = ((1.0, 0.0), (0.1, 0.2))[view]
    g = torch.Generator().manual_seed(11)
    y = A.color_jitter(batch.clone(), 0.4, 0.4, 0.2, 0.1, p=0.8, generator=g)
    y = A.random_blur(A.random_grayscale(y, 0.2, g), (0.1, 2.0), p=blur, generator=g)
    y = A.normalize_(A.random_solarize(y, solar, g) if solar else y)
    assert_close(A.augment(batch, "v3", torch.Generator().manual_seed(11), view=view), y)


def test_jitter_applies_each_samples_ops_in_its_order():
    """The mask-free jitter is, sample by sample, torchvision's ColorJitter: the four ops with the
    drawn factors in the drawn order, or nothing when RandomApply said no."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 3, 5, 7, generator=g)
    params = A.jitter_params(len(x), 0.4, 0.4, 0.4, 0.1, 0.8, g, x.device)
    factors, apply, order = params
    assert 0 < int(apply.sum()) < len(x) and len({tuple(o) for o in order.tolist()}) > 5
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for i, img in enumerate(x):
        for k in order[i].tolist() if apply[i] else []:
            img = ops[k](img, float(factors[k, i]))
        expected.append(img)
    assert_close(A.apply_jitter(x.clone(), *params), torch.stack(expected), atol=2e-6, rtol=0)


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_augment_never_waits_for_the_device_nor_copies_to_it(version):
    """On the meta device (a device that is not the CPU, with no data): no op reads device data
    (nonzero, item, copies back) and nothing is copied from the CPU per call: the random
    parameters are drawn on the device. The constant tables are made once per device."""
    from moco_ray.syncs import HostSyncs

    x = torch.empty(8, 3, 32, 32, dtype=torch.uint8, device="meta")
    A.augment(x, version)                                             # the per-device constants
    with HostSyncs() as syncs:
        for _ in range(3):
            y = A.augment(x, version)
    assert syncs.count == 0 and not syncs.uploads, (syncs.ops, syncs.uploads)
    assert y.device.type == "meta" and y.shape == x.shape


def test_host_sync_counter_counts_reads_of_device_data():
    from moco_ray.syncs import HostSyncs

    t = torch.tensor([0.0, 2.0, 0.0])
    with HostSyncs() as syncs:
        t[t > 1].sum().item()            # boolean-mask indexing (a nonzero inside); item: _local_scalar_dense
        float(t.max()), t.tolist()       # _local_scalar_dense; tolist stands for a copy back
        (t * 2).exp_()                   # no read
    assert dict(syncs.ops) == {"mask_index": 1, "_local_scalar_dense": 2, "tolist": 1}
    with HostSyncs() as syncs, pytest.raises(NotImplementedError):
        torch.empty(2, device="meta").to("cpu")                       # a copy back, counted first
    assert dict(syncs.ops) == {"_to_copy": 1}
    with HostSyncs() as syncs:
        t.nonzero(), t.masked_fill_(t > 1, 0.0), t.index_put_((t > 1,), torch.tensor(1.0))
    assert dict(syncs.ops) == {"nonzero": 1, "mask_index": 1}
