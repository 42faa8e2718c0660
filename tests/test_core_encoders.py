"""Backbones of any family, their feature width, moco-v3's MLPs and its ViT stability measures."""
import math

import pytest
import torch
import torch.nn as nn
import torchvision

from moco_ray.encoders import build_backbone, build_v3_encoders, kind, sincos_2d
from moco_ray.model import SplitBatchNorm1d


@pytest.mark.parametrize("arch, res, width", [
    ("resnet18", 32, 512), ("resnext50_32x4d", 32, 2048), ("vit_b_16", 32, 768),
    ("vit_small", 32, 384), ("timm:convnext_atto", 32, 320), ("timm:resnet18", 32, 512),
])
def test_feature_width_of_any_family(arch, res, width):
    backbone, features = build_backbone(arch, res)
    assert features == width
    assert backbone(torch.randn(2, 3, res, res)).shape == (2, width)


def test_moco_v3_vit_small_has_12_heads():
    backbone, _ = build_backbone("vit_small", 32)
    assert backbone.blocks[0].attn.num_heads == 12 and backbone.embed_dim == 384


def test_kind():
    assert [kind(a) for a in ("resnet50", "wide_resnet50_2", "vit_l_16", "vit_base", "timm:x")] == \
        ["resnet", "resnet", "vit", "timm", "timm"]
    with pytest.raises(ValueError, match="arch='alexnet'"):
        kind("alexnet")


def test_sincos_2d_formula():
    grid, dim = 3, 8
    emb = sincos_2d(grid, dim)
    omega = [1 / 10000 ** (i / 2) for i in range(2)]
    for t in range(grid * grid):
        row, col = divmod(t, grid)
        expected = [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega] + \
                   [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
        assert torch.allclose(emb[t], torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("arch", ["vit_b_16", "vit_small"])
def test_vit_fixed_position_embedding_and_frozen_patch_projection(arch):
    backbone, _ = build_backbone(arch, 64, stop_grad_conv1=True)
    if arch == "vit_b_16":
        pos, proj = backbone.encoder.pos_embedding, backbone.conv_proj
    else:
        pos, proj = backbone.pos_embed, backbone.patch_embed.proj
    assert not pos.requires_grad and not any(p.requires_grad for p in proj.parameters())
    assert torch.equal(pos[0, 0], torch.zeros(pos.shape[-1]))            # the class token's
    assert torch.allclose(pos[0, 1:], sincos_2d(4, pos.shape[-1]))
    trainable, _ = build_backbone(arch, 64)
    patch = trainable.conv_proj if arch == "vit_b_16" else trainable.patch_embed.proj
    assert all(p.requires_grad for p in patch.parameters())


def layer_types(mlp):
    return [(type(m).__name__, getattr(m, "affine", None)) for m in mlp]


def test_v3_mlps_as_the_paper():
    base, predictor = build_v3_encoders("resnet18", dim=16, mlp_dim=32, res=32)
    lin, bn, relu = ("Linear", None), ("SplitBatchNorm1d", True), ("ReLU", None)
    assert layer_types(base.fc) == [lin, bn, relu, lin, ("SplitBatchNorm1d", False)]
    assert layer_types(predictor) == [lin, bn, relu, lin]                 # ResNet: no last BN
    assert all(m.bias is None for m in base.modules() if isinstance(m, nn.Linear))
    assert base.fc[0].in_features == 512 and predictor[-1].out_features == 16
    vit, vit_predictor = build_v3_encoders("vit_small", dim=16, mlp_dim=32, res=32)
    assert layer_types(vit.fc) == [lin, bn, relu, lin, bn, relu, lin, ("SplitBatchNorm1d", False)]
    assert layer_types(vit_predictor)[-1] == ("SplitBatchNorm1d", False)
    assert all(isinstance(m, SplitBatchNorm1d) for m in vit.fc if "Norm" in type(m).__name__)


def test_v3_resnet_keeps_torchvision_layout():
    base, _ = build_v3_encoders("resnet50", dim=16, mlp_dim=32)
    backbone = {k: v for k, v in base.state_dict().items() if not k.startswith("fc.")}
    result = torchvision.models.resnet50().load_state_dict(backbone, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    assert all(torch.count_nonzero(block.bn3.weight) == 0 for block in base.layer1)  # zero-init residual


def test_moco_v3_vit_initialisation():
    backbone, _ = build_backbone("vit_small", 32)
    qkv = backbone.blocks[0].attn.qkv
    bound = math.sqrt(6.0 / (384 + 384))                 # q, k, v: three 384 x 384 matrices
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound
    fc1 = backbone.blocks[0].mlp.fc1
    assert fc1.weight.abs().max() <= math.sqrt(6.0 / (384 + 1536)) and torch.count_nonzero(fc1.bias) == 0
    assert backbone.cls_token.abs().max() < 1e-5
    proj_bound = math.sqrt(6.0 / (3 * 16 * 16 + 384))
    assert backbone.patch_embed.proj.weight.abs().max() <= proj_bound
