"""Batched on-device colour augmentations of MoCo v1 and v2 ("aug+"), then ImageNet normalisation.

The crops and flips happen in the loader (ffcv, or torchvision on PIL images); what is left runs
here on whole batches on the worker's device, with one random draw per sample:

    v1: RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4)                   (MoCo v1)
    v2: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8), RandomGrayscale(p=0.2),
        RandomApply(GaussianBlur(sigma in [0.1, 2.0]), p=0.5)                     (MoCo v2)

Each op matches torchvision.transforms.v2.functional on float images in [0, 1]; the colour jitter
applies its four ops in a random order per sample, as torchvision's ColorJitter does. Call
`augment` once per view: the two views get independent draws.
"""
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
VERSIONS = ("v1", "v2", "none", None)


def to_float(x):
    """A float32 copy in [0, 1]."""
    y = x.to(torch.float32, copy=True)
    return y.div_(255) if x.dtype == torch.uint8 else y


@lru_cache(maxsize=None)
def _affine(device, top):
    """(a, b) with (x / top - mean) / std = a * x + b, per channel, as (1, 3, 1, 1) on device."""
    a = torch.tensor([1 / (top * s) for s in STD], device=device).view(1, 3, 1, 1)
    b = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=device).view(1, 3, 1, 1)
    return a, b


def normalize_(x, top=1.0):
    """ImageNet mean/std normalisation, in place on a float batch in [0, top] (top=255: the values
    of uint8 pixels), in one pass over x."""
    a, b = _affine(x.device, float(top))
    return torch.addcmul(b, x, a, out=x)


def _col(f):
    return f.view(-1, 1, 1, 1)


def _blend(a, b, ratio):
    return (a * _col(ratio) + b * (1 - _col(ratio))).clamp_(0, 1)


def grayscale(x):
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def adjust_brightness(x, factor):
    return (x * _col(factor)).clamp_(0, 1)


def adjust_contrast(x, factor):
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), factor)


def _rgb_to_hsv(x):
    r, g, _ = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / torch.where(eqc, ones, cr).unsqueeze(1)).unbind(1)
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder_(6)
    p = (v * (1 - s)).clamp_(0, 1)
    q = (v * (1 - s * f)).clamp_(0, 1)
    t = (v * (1 - s * (1 - f))).clamp_(0, 1)
    vpqt = torch.stack((v, p, q, t), 1)
    # for each hue sextant i, which of (v, p, q, t) is r, g and b
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=h.device)
    return vpqt.gather(1, table[:, i].movedim(0, 1))


def adjust_hue(x, factor):
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + _col(factor)[:, 0]).remainder_(1.0), s, v)


def _kernel_size(x):
    k = int(0.1 * min(x.shape[-2:])) // 2 * 2 + 1
    return max(k, 3)


def gaussian_blur(x, sigma, kernel_size=None):
    """Per-sample sigma, separable, reflect padding: torchvision's gaussian_blur for each sample."""
    k = kernel_size or _kernel_size(x)
    B, C, H, W = x.shape
    lim = (k - 1) / (2.0 * math.sqrt(2.0))
    grid = torch.linspace(-lim, lim, k, device=x.device, dtype=x.dtype)
    w = torch.softmax(-(grid / sigma.view(-1, 1).to(x.dtype)) ** 2, dim=1)  # (B, k)
    w = w.repeat_interleave(C, 0)                                             # one kernel per channel
    y = F.pad(x, [k // 2] * 4, mode="reflect").reshape(1, B * C, H + k - 1, W + k - 1)
    y = F.conv2d(y, w.view(B * C, 1, 1, k), groups=B * C)
    y = F.conv2d(y, w.view(B * C, 1, k, 1), groups=B * C)
    return y.view(B, C, H, W)


def _uniform(n, lo, hi, g, device):
    return (torch.rand(n, generator=g) * (hi - lo) + lo).to(device)


def _chance(n, p, g, device):
    return (torch.rand(n, generator=g) < p).to(device)


def _subset(x, mask, fn, *args):
    """Applies fn in place to the samples where mask is set (fn gets the matching rows of args)."""
    idx = mask.nonzero().squeeze(1)
    if len(idx):
        x[idx] = fn(x[idx], *(a[idx] for a in args))
    return x


def color_jitter(x, brightness, contrast, saturation, hue, p=1.0, generator=None):
    """In place on the float batch x, like random_grayscale and random_blur."""
    B, dev = len(x), x.device
    factors = [
        _uniform(B, max(0.0, 1 - brightness), 1 + brightness, generator, dev),
        _uniform(B, max(0.0, 1 - contrast), 1 + contrast, generator, dev),
        _uniform(B, max(0.0, 1 - saturation), 1 + saturation, generator, dev),
        _uniform(B, -hue, hue, generator, dev),
    ]
    ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    apply = _chance(B, p, generator, dev)
    order = torch.rand(B, 4, generator=generator).argsort(1).to(dev)   # a random op order per sample
    for t in range(4):
        for k, op in enumerate(ops):
            x = _subset(x, apply & (order[:, t] == k), op, factors[k])
    return x


def random_grayscale(x, p, generator=None):
    return _subset(x, _chance(len(x), p, generator, x.device), lambda y: grayscale(y).expand_as(y))


def random_blur(x, sigma, p, generator=None):
    s = _uniform(len(x), sigma[0], sigma[1], generator, x.device)
    return _subset(x, _chance(len(x), p, generator, x.device), gaussian_blur, s)


def augment(x, version, generator=None):
    """x: (B, 3, H, W) uint8 or float in [0, 1], already cropped and flipped. Returns the
    augmented, normalised float32 batch on x's device (x itself is not modified). version: 'v1',
    'v2', or None / 'none' (normalise only). generator: an optional CPU torch.Generator for the random parameters."""
    if version not in VERSIONS:
        raise ValueError(f"augmentation {version!r} is not one of {VERSIONS}")
    if version in (None, "none") and x.dtype == torch.uint8:
        return normalize_(x.to(torch.float32), 255)     # the [0, 1] scaling folded into the normalisation
    x = to_float(x)
    if version == "v1":
        x = random_grayscale(x, 0.2, generator)
        x = color_jitter(x, 0.4, 0.4, 0.4, 0.4, p=1.0, generator=generator)
    elif version == "v2":
        x = color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8, generator=generator)
        x = random_grayscale(x, 0.2, generator)
        x = random_blur(x, (0.1, 2.0), p=0.5, generator=generator)
    return normalize_(x)
