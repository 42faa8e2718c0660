"""Backbones of any architecture and MoCo v3's projector and predictor MLPs.

arch names:
    resnet18, resnet50, resnext50_32x4d, wide_resnet50_2, ...   every torchvision ResNet
    vit_b_16, vit_l_16, ...                                       torchvision's ViTs
    vit_small, vit_base                                  moco-v3's ViT-S/16 (12 heads) and ViT-B/16, built by timm
    timm:NAME                                                     any timm model, e.g. timm:convnext_tiny
Weights always start random: nothing is ever downloaded.

An encoder is a module whose `fc` is its head: replacing `fc` by nn.Identity gives the pooled
features of the backbone (what the kNN monitor, linear evaluation and exports use). A torchvision
ResNet keeps its own layout (its fc is the head, so its state dict is torchvision's with only fc.*
different); any other backbone is wrapped as Encoder(backbone, fc).
"""
import math

import torch
import torch.nn as nn
import torchvision

from .model import SplitBatchNorm1d, resnet

# moco-v3's ViTs (its vits.py): ViT-S/16 has 12 heads of 32 channels, timm's vit_small has 6 of 64
MOCO_VITS = {"vit_small": ("vit_small_patch16_224", dict(num_heads=12)),
             "vit_base": ("vit_base_patch16_224", {})}
RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")
VIT_PREFIXES = ("vit_", "deit_", "deit3_")


def kind(arch: str) -> str:
    """'resnet' (torchvision ResNet), 'vit' (torchvision ViT), 'timm' (timm or moco-v3 ViT); or a
    ValueError naming what is accepted."""
    if arch.startswith("timm:") or arch in MOCO_VITS:
        return "timm"
    names = set(torchvision.models.list_models(module=torchvision.models))
    if arch in names and arch.startswith(RESNET_PREFIXES):
        return "resnet"
    if arch in names and arch.startswith("vit_"):
        return "vit"
    raise ValueError(f"arch={arch!r}: use a torchvision ResNet (resnet50, resnext50_32x4d, ...), a torchvision "
                     f"ViT (vit_b_16, ...), vit_small/vit_base (moco-v3's) or timm:NAME")


def is_vit(arch: str) -> bool:
    """A vision transformer by its name (no model built): channels_last means nothing to it, its
    activations after the patch embedding being (N, tokens, C)."""
    name = arch[len("timm:"):] if arch.startswith("timm:") else arch
    return arch in MOCO_VITS or name.startswith(VIT_PREFIXES)


def check_timm_name(arch: str) -> None:
    import timm

    name = MOCO_VITS[arch][0] if arch in MOCO_VITS else arch[len("timm:"):]
    if not timm.is_model(name):
        raise ValueError(f"arch={arch!r}: timm {timm.__version__} has no model {name!r}")


class Encoder(nn.Module):
    """A backbone that outputs pooled features, followed by the head `fc`."""

    def __init__(self, backbone: nn.Module, fc: nn.Module):
        super().__init__()
        self.backbone, self.fc = backbone, fc

    def forward(self, x):
        return self.fc(self.backbone(x))


def build_backbone(arch, res=224, small_stem=False, num_splits=1, zero_init_residual=False,
                   stop_grad_conv1=False, width=64):
    """(backbone, feature_dim): a module from images to pooled features, randomly initialised.

    The feature dimension is found by one forward pass of two black images of res x res through the
    backbone in eval mode, whatever the architecture: it needs no per-family attribute (fc.in_features,
    hidden_dim, num_features) and checks that the classifier is gone. ResNets are moco_ray.model.resnet's
    (SplitBatchNorm, so split-BN and SyncBN conversion apply; width scales their stages); ViTs get
    moco-v3's fixed 2-D sin-cos position embedding, and with stop_grad_conv1 its frozen random patch
    projection."""
    family = kind(arch)
    if family == "resnet":
        net = resnet(arch, small_stem=small_stem, num_splits=num_splits, zero_init_residual=zero_init_residual,
                     width=width)
        net.fc = nn.Identity()
    elif family == "vit":
        net = getattr(torchvision.models, arch)(weights=None, image_size=res)
        net.heads = nn.Identity()   # the class token's features
        _vit_stability(net.conv_proj, net.encoder.pos_embedding, 1, res // net.patch_size, stop_grad_conv1)
    else:
        net = _timm_backbone(arch, res, stop_grad_conv1)
    return net, _feature_dim(net, res)


def _timm_backbone(arch, res, stop_grad_conv1):
    import timm

    check_timm_name(arch)
    name, kwargs = MOCO_VITS.get(arch, (arch[len("timm:"):], {}))
    if name.startswith(VIT_PREFIXES):  # a ViT's position embedding is built for one image size
        kwargs = dict(kwargs, img_size=res)
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if arch in MOCO_VITS:
        _moco_v3_vit_init(net)
    if hasattr(net, "patch_embed") and getattr(net, "pos_embed", None) is not None:
        grid = net.patch_embed.grid_size
        _vit_stability(net.patch_embed.proj, net.pos_embed, net.pos_embed.shape[1] - grid[0] * grid[1],
                       grid[0], stop_grad_conv1)
    elif stop_grad_conv1:
        raise ValueError(f"stop_grad_conv1: {arch} has no ViT patch embedding")
    return net


def _moco_v3_vit_init(net):
    """moco-v3's ViT initialisation: xavier-uniform Linear weights, q, k and v each as its own
    (dim x dim) matrix, zero biases, the class token N(0, 1e-6), a xavier-uniform patch projection
    (fan-in 3*p*p, fan-out the width)."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(net.cls_token, std=1e-6)
    proj = net.patch_embed.proj
    bound = math.sqrt(6.0 / (3 * proj.kernel_size[0] * proj.kernel_size[1] + proj.out_channels))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)


def _vit_stability(patch_proj: nn.Conv2d, pos_embed: nn.Parameter, prefix_tokens, grid, stop_grad_conv1):
    """moco-v3's ViT: a fixed (not learned) 2-D sin-cos position embedding, zero on the class token,
    and optionally a frozen random patch projection (the paper's fix for the training instability)."""
    with torch.no_grad():
        pos_embed.zero_()
        pos_embed[0, prefix_tokens:] = sincos_2d(grid, pos_embed.shape[-1])
    pos_embed.requires_grad = False
    if stop_grad_conv1:
        for p in patch_proj.parameters():
            p.requires_grad = False


def sincos_2d(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(grid*grid, dim): token t = row*grid + col gets [sin(row w), cos(row w), sin(col w), cos(col w)]
    with dim/4 frequencies w_i = temperature^(-i/(dim/4)), as moco-v3's vits.py (whose meshgrid
    names the row coordinate w)."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    row, col = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                              indexing="ij")
    a, b = row.flatten()[:, None] * omega, col.flatten()[:, None] * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)


@torch.no_grad()
def _feature_dim(backbone: nn.Module, res: int) -> int:
    was_training = backbone.training
    out = backbone.eval()(torch.zeros(2, 3, res, res))
    backbone.train(was_training)
    if out.dim() != 2:
        raise ValueError(f"the backbone gives features of shape {tuple(out.shape)}, not pooled (N, C)")
    return out.shape[1]


def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True, num_splits=1):
    """moco-v3's MLP: Linear (no bias) - BN - ReLU for every layer but the last, whose Linear is
    followed by a BN without affine parameters when last_bn (SimCLR's design without gamma)."""
    layers = []
    for i in range(num_layers):
        d_in, d_out = in_dim if i == 0 else hidden_dim, out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [SplitBatchNorm1d(d_out, num_splits), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(SplitBatchNorm1d(d_out, num_splits, affine=False))
    return nn.Sequential(*layers)


def residuals_start_at_zero(method, asked=False):
    """Whether a ResNet's residual branches start at zero, each block the identity: always for v3 (moco-v3's
    main_moco.py), for v1/v2 when the config asks (its zero_init_residual)."""
    return method == "v3" or bool(asked)


def build_v3_encoders(arch, dim=256, mlp_dim=4096, res=224, small_stem=False, num_splits=1,
                      stop_grad_conv1=False, width=64):
    """(base encoder = backbone + projector, predictor) as moco-v3's builder.py. ViTs (any model
    with a patch embedding) get a 3-layer projector and a 2-layer predictor with its last BN; every
    other backbone the ResNet recipe: a 2-layer projector and a 2-layer predictor without its last
    BN (torchvision ResNets also start with zero-initialised residual BN, as main_moco.py)."""
    family = kind(arch)
    backbone, features = build_backbone(arch, res, small_stem, num_splits,
                                        zero_init_residual=family == "resnet" and residuals_start_at_zero("v3"),
                                        stop_grad_conv1=stop_grad_conv1, width=width)
    vit = family == "vit" or hasattr(backbone, "patch_embed")
    projector = mlp(3 if vit else 2, features, mlp_dim, dim, num_splits=num_splits)
    if family == "resnet":
        backbone.fc = projector
        base = backbone
    else:
        base = Encoder(backbone, projector)
    return base, mlp(2, dim, mlp_dim, dim, last_bn=vit, num_splits=num_splits)

