"""Encoders and heads, torchvision-compatible state dicts, and the momentum update."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from moco_ray.model import SplitBatchNorm, SplitBatchNorm1d, build_encoder, momentum_update, resnet


@pytest.mark.parametrize("arch,hidden", [("resnet18", 512), ("resnet50", 2048)])
def test_heads(arch, hidden):
    v1 = build_encoder(arch, 128, mlp=False, small_stem=False)
    assert isinstance(v1.fc, nn.Linear) and v1.fc.out_features == 128
    v2 = build_encoder(arch, 128, mlp=True, small_stem=False)
    assert [type(m) for m in v2.fc] == [nn.Linear, nn.ReLU, nn.Linear]
    assert v2.fc[0].in_features == v2.fc[0].out_features == hidden and v2.fc[2].out_features == 128
    bn = build_encoder(arch, 128, mlp=True, small_stem=False, head_bn=True)
    assert [type(m) for m in bn.fc] == [nn.Linear, SplitBatchNorm1d, nn.ReLU, nn.Linear]
    assert bn.fc[1].num_features == hidden


def test_head_bn_splits_like_per_group_batchnorm1d():
    torch.manual_seed(0)
    x = torch.randn(12, 6) * 3 + 1
    split = SplitBatchNorm1d(6, num_splits=3).train()
    reference = nn.BatchNorm1d(6).train()
    expected = torch.empty_like(x)
    for s in range(3):  # sample j is in split j % 3
        expected[s::3] = reference(x[s::3])
    assert torch.allclose(split(x), expected, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mlp", [False, True])
def test_backbone_loads_into_torchvision_with_only_fc_differing(arch, mlp):
    encoder = build_encoder(arch, 128, mlp=mlp, small_stem=False, num_splits=4)
    state = encoder.state_dict()
    assert any(k.startswith("fc.") for k in state)  # the head lives under fc.*
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = getattr(torchvision.models, arch)().load_state_dict(backbone, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []


def test_small_stem_keeps_32px_resolution():
    encoder = build_encoder("resnet18", 32, mlp=True, small_stem=True)
    assert encoder.conv1.kernel_size == (3, 3) and encoder.conv1.stride == (1, 1)
    assert isinstance(encoder.maxpool, nn.Identity)
    features = {}
    encoder.layer4.register_forward_hook(lambda m, i, o: features.update(out=o))
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert features["out"].shape[-1] == 4  # 32 / 8: no stride-2 conv1, no max-pool
    assert all(type(m) is SplitBatchNorm for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))


class Wrapper(nn.Module):  # what DistributedDataParallel looks like from outside
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_momentum_update():
    torch.manual_seed(0)
    q = build_encoder("resnet18", 8, mlp=True, small_stem=True)
    k = copy.deepcopy(q)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(torch.randn_like(p))
    k0 = [p.clone() for p in k.parameters()]
    momentum_update(Wrapper(q), k, 0.99)
    for p_q, p_k, p_k0 in zip(q.parameters(), k.parameters(), k0):
        torch.testing.assert_close(p_k, 0.99 * p_k0 + 0.01 * p_q)
    assert all(p.grad is None for p in k.parameters())


def test_sync_bn_conversion_keeps_the_state_dict():
    encoder = build_encoder("resnet18", 8, mlp=False, small_stem=True)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(encoder))
    assert not any(isinstance(m, SplitBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == list(encoder.state_dict())


def test_split_bn_keeps_channels_last():
    """A channels_last batch comes out channels_last (not NCHW, which would make the next layers mix
    formats), with the values and running statistics of the NCHW batch."""
    x = torch.randn(6, 4, 5, 3, generator=torch.Generator().manual_seed(0))
    plain, last = SplitBatchNorm(4, num_splits=3).train(), SplitBatchNorm(4, num_splits=3).train()
    y_plain, y_last = plain(x), last(x.contiguous(memory_format=torch.channels_last))
    assert y_last.is_contiguous(memory_format=torch.channels_last) and not y_last.is_contiguous()
    assert y_plain.is_contiguous()
    torch.testing.assert_close(y_last, y_plain)
    torch.testing.assert_close(last.running_var, plain.running_var)


def test_width_64_is_torchvisions_resnet_and_narrower_ones_scale_every_stage():
    torch.manual_seed(0)
    ours = resnet("resnet18")
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))

    full = sum(p.numel() for p in resnet("resnet18", small_stem=True).parameters())
    narrow = resnet("resnet18", num_classes=10, small_stem=True, zero_init_residual=True, width=16)
    widths = [narrow.conv1.out_channels] + [stage[-1].conv2.out_channels
                                            for stage in (narrow.layer1, narrow.layer2, narrow.layer3, narrow.layer4)]
    assert widths == [16, 16, 32, 64, 128] and narrow.fc.in_features == 128
    assert 0.9 / 16 < sum(p.numel() for p in narrow.parameters()) / full < 1.1 / 16   # (width / 64)**2
    assert all(not block.bn2.weight.any() for stage in (narrow.layer1, narrow.layer4) for block in stage)
    assert narrow(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
    bottleneck = resnet("resnet50", width=32)
    assert bottleneck.layer4[-1].conv3.out_channels == 1024 and bottleneck.fc.in_features == 1024


def test_the_width_survives_an_export():
    from moco_ray import export

    encoder = build_encoder("resnet18", 128, mlp=True, small_stem=True, width=16)
    backbone = {k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
    assert export.infer_arch(backbone) == ("resnet18", True, 224, 16)
