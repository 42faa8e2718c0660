"""Encoders (torchvision ResNets with a MoCo head), split-BN and the momentum update."""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that in train mode normalises each of `num_splits` sub-batches on its own.

    Sample j belongs to split j % num_splits (as in the authors' single-GPU demo). The parameters
    and buffers are those of BatchNorm2d, so state dicts are interchangeable; num_splits is not
    saved and can be changed at any time with set_bn_splits.

    The output keeps the input's memory format. Grouping S samples into S*C channels is a view only
    in the contiguous (NCHW) format (in channels_last, channel c of sample s sits at s*H*W*C + c:
    not one stride), so a channels_last batch is copied into NCHW for the statistics either way;
    the result is copied back to channels_last here, so that the ReLU, the residual add and the
    next convolution see the format the model runs in instead of a mix (one copy for the one the
    next convolution would make).
    """

    def __init__(self, num_features, num_splits=1, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, input):
        S = self.num_splits
        if S == 1 or not self.training:
            return super().forward(input)
        N, C, H, W = input.shape
        if N % S:
            raise ValueError(f"SplitBatchNorm: batch {N} not divisible by num_splits {S}")
        running_mean = self.running_mean.repeat(S) if self.track_running_stats else None
        running_var = self.running_var.repeat(S) if self.track_running_stats else None
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as BatchNorm2d
            momentum = 1.0 / float(self.num_batches_tracked) if self.track_running_stats else 0.0
        weight = self.weight.repeat(S) if self.affine else None
        bias = self.bias.repeat(S) if self.affine else None
        # (N, C) -> (N/S, S*C): channel s*C + c of row a is channel c of sample a*S + s
        out = F.batch_norm(input.reshape(-1, S * C, H, W), running_mean, running_var,
                           weight, bias, True, momentum, self.eps).reshape(N, C, H, W)
        if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        if self.track_running_stats:
            self.running_mean.copy_(running_mean.view(S, C).mean(0))
            self.running_var.copy_(running_var.view(S, C).mean(0))
        return out


class SplitBatchNorm1d(SplitBatchNorm):
    """SplitBatchNorm over the features of a (N, C) batch: the MLP head's optional hidden BN."""

    def forward(self, input):
        return super().forward(input[:, :, None, None])[:, :, 0, 0]


def set_bn_splits(module: nn.Module, num_splits: int) -> nn.Module:
    for m in module.modules():
        if isinstance(m, SplitBatchNorm):
            m.num_splits = num_splits
    return module


class ScaledResNet(torchvision.models.ResNet):
    """torchvision's ResNet with the width of every stage scaled by width / 64: stage i has
    width * 2**i channels (times the block's expansion) instead of 64 * 2**i. Blocks, strides and
    initialisation are torchvision's; width=64 is torchvision's model, parameter for parameter.
    Compute and parameters scale as (width / 64)**2: width 16 costs 1/16 of the standard model."""

    def __init__(self, block, layers, width=64, num_classes=1000, **kw):
        self.width = width
        super().__init__(block, layers, num_classes=num_classes, **kw)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = self._norm_layer(width)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:   # the first stage: its input is the stem's output
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)


def resnet(arch, num_classes=1000, small_stem=False, num_splits=1, zero_init_residual=False, width=64):
    """A randomly initialised torchvision ResNet with SplitBatchNorm (split-BN and SyncBN conversion
    apply). small_stem: a 3x3 stride-1 conv1 and no max-pool, for 32px images. zero_init_residual:
    each residual branch's last BN starts at zero, so every block starts as the identity (moco-v3's
    main_moco.py; Goyal et al. 2017). width: ScaledResNet's, 64 = torchvision's own."""
    if not (arch.startswith(("resnet", "resnext", "wide_resnet")) and hasattr(torchvision.models, arch)):
        raise ValueError(f"arch must be a torchvision ResNet (resnet18, resnet50, ...), got {arch!r}")
    norm = partial(SplitBatchNorm, num_splits=num_splits)
    build = partial(getattr(torchvision.models, arch), weights=None, num_classes=num_classes, norm_layer=norm,
                    zero_init_residual=zero_init_residual)
    if width == 64:
        net = build()
    else:
        with torch.device("meta"):  # the stock model only names its block type and depths: nothing allocated
            stock = build()
        net = ScaledResNet(type(stock.layer1[0]), [len(s) for s in (stock.layer1, stock.layer2, stock.layer3,
                                                                    stock.layer4)],
                           width, num_classes, norm_layer=norm, zero_init_residual=zero_init_residual,
                           groups=stock.groups, width_per_group=stock.base_width)
    if small_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net


def build_encoder(arch: str, dim: int, mlp: bool, small_stem: bool, num_splits: int = 1,
                  head_bn: bool = False, zero_init_residual: bool = False, width: int = 64) -> nn.Module:
    """A torchvision ResNet (see resnet()) whose `fc` is the MoCo head (v1: linear; v2: MLP when mlp=True).

    head_bn puts a BatchNorm between the MLP's hidden layer and its ReLU (SimCLR, MoCo v3). It is
    not in the MoCo papers; the demo needs it: on the digits, whose images share one black
    background, every image has nearly the same features at init, and without it the query
    encoder collapses to one output within the first steps and never recovers."""
    net = resnet(arch, dim, small_stem, num_splits, zero_init_residual, width)
    if mlp:  # hidden width = feature width: 2048 for resnet50, 512 for resnet18
        dim_mlp = net.fc.weight.shape[1]
        hidden = [SplitBatchNorm1d(dim_mlp, num_splits)] if head_bn else []
        net.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), *hidden, nn.ReLU(), net.fc)
    return net


@torch.no_grad()
def momentum_update(encoder_q: nn.Module, encoder_k: nn.Module, m: float) -> None:
    """theta_k = m * theta_k + (1 - m) * theta_q, one tensor at a time (the paper's loop; the
    reference that MomentumUpdate is tested against). encoder_q may be wrapped by DDP."""
    encoder_q = getattr(encoder_q, "module", encoder_q)
    for param_q, param_k in zip(encoder_q.parameters(), encoder_k.parameters()):
        param_k.mul_(m).add_(param_q.detach(), alpha=1.0 - m)


class MomentumUpdate:
    """The same update as momentum_update, fused: two multi-tensor kernels (_foreach_mul_ and
    _foreach_add_, the same arithmetic in the same order, so the result is bitwise equal) instead of
    two kernels per parameter tensor (about 320 launches a step for a ResNet-50 with its MLP head).

    The lists of Parameter objects are built once. Module.to() and load_state_dict() keep those
    objects (they replace or copy into their data), so the lists stay valid; DDP wraps encoder_q without
    replacing its parameters.
    Buffers (BN running statistics) are not averaged, as in the authors' code: the key encoder's BN
    layers keep their own running statistics, updated by its forward passes in train mode."""

    def __init__(self, encoder_q: nn.Module, encoder_k: nn.Module):
        encoder_q = getattr(encoder_q, "module", encoder_q)
        self.params_q = list(encoder_q.parameters())
        self.params_k = list(encoder_k.parameters())
        if len(self.params_q) != len(self.params_k):
            raise ValueError("encoder_q and encoder_k have different parameters")

    @torch.no_grad()
    def __call__(self, m: float) -> None:
        torch._foreach_mul_(self.params_k, m)
        torch._foreach_add_(self.params_k, self.params_q, alpha=1.0 - m)
