"""Batched on-device colour augmentations of MoCo v1 and v2 ("aug+"), then ImageNet normalisation.

The crops and flips happen in the loader (ffcv, or torchvision on PIL images); what is left runs
here on whole batches on the worker's device, with one random draw per sample:

    v1: RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4)                   (MoCo v1)
    v2: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8), RandomGrayscale(p=0.2),
        RandomApply(GaussianBlur(sigma in [0.1, 2.0]), p=0.5)                     (MoCo v2)
    v3: RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale(p=0.2), then a pair
        of different views (BYOL's, as moco-v3's main_moco.py): view 0 always blurred; view 1
        blurred with p=0.1 and RandomApply(Solarize(threshold 0.5), p=0.2)      (MoCo v3)

Each op matches torchvision.transforms.v2.functional on float images in [0, 1]; the colour jitter
applies its four ops in a random order per sample, as torchvision's ColorJitter does. Call
`augment` once per view: the two views get independent draws.

The random parameters are drawn on the batch's device, and which samples an op applies to is
chosen with torch.where, never by indexing with a mask: both would make the host wait for the
device (a copy of the parameters, a nonzero), 36 times a step before. The price is that a random op
runs on every sample and keeps its result for the chosen ones (RandomGrayscale, the blur of v2).
"""
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
VERSIONS = ("v1", "v2", "v3", "none", None)
# v3's two views differ: (blur p, solarize p) of view 0 and of view 1
V3_VIEWS = ((1.0, 0.0), (0.1, 0.2))


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


def denormalize(x):
    """The inverse of normalize_: a normalised batch back in [0, 1] (a new tensor)."""
    a, b = _affine(x.device, 1.0)
    return (x - b) / a


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


@lru_cache(maxsize=None)
def _sextants(device):
    """For each hue sextant i (columns), which of (v, p, q, t) is r, g and b (rows); made once per
    device, not copied to it per call."""
    return torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=device)


def _hsv_to_rgb(h, s, v):
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder_(6)
    p = (v * (1 - s)).clamp_(0, 1)
    q = (v * (1 - s * f)).clamp_(0, 1)
    t = (v * (1 - s * (1 - f))).clamp_(0, 1)
    vpqt = torch.stack((v, p, q, t), 1)
    return vpqt.gather(1, _sextants(h.device)[:, i].movedim(0, 1))


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
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _chance(n, p, g, device):
    return torch.rand(n, generator=g, device=device) < p


def _pick(mask, y, x):
    """y for the samples whose flag in mask (B,) is set, x for the others. Indexing by the mask
    instead would read how many flags are set (a nonzero): a wait for the device."""
    return torch.where(_col(mask), y, x)


def jitter_params(B, brightness, contrast, saturation, hue, p, generator, device):
    """The random parameters of B colour jitters, drawn on `device`: factors (4, B) of brightness,
    contrast, saturation and hue; apply (B,) whether a sample is jittered (RandomApply p); order
    (B, 4) the sample's random order of the four ops (0..3 in that list)."""
    factors = torch.stack([
        _uniform(B, max(0.0, 1 - brightness), 1 + brightness, generator, device),
        _uniform(B, max(0.0, 1 - contrast), 1 + contrast, generator, device),
        _uniform(B, max(0.0, 1 - saturation), 1 + saturation, generator, device),
        _uniform(B, -hue, hue, generator, device),
    ])
    apply = _chance(B, p, generator, device)
    order = torch.rand(B, 4, generator=generator, device=device).argsort(1)
    return factors, apply, order


HUE = 3  # ops 0, 1, 2 (brightness, contrast, saturation) are blends; op 3 (hue) is not


def _blend_slot(x, op, factors):
    """One slot of the jitter on every sample: op (B,) picks brightness (0), contrast (1) or
    saturation (2) per sample, or nothing (-1). Each is a blend of x with another image (0, the
    grey mean, the grey image), so one blend with a per-sample partner does any of them; ratio 1
    returns x exactly (x * 1 + partner * 0, clamped to [0, 1] where x already is)."""
    gray = grayscale(x)
    partner = _col(op == 1) * gray.mean(dim=(1, 2, 3), keepdim=True) + _col(op == 2) * gray
    ratio = torch.where(op >= 0, factors.gather(0, op.clamp(min=0)[None])[0], 1.0)
    return _blend(x, partner, ratio)


def apply_jitter(x, factors, apply, order):
    """The jitter of jitter_params on the float batch x, without indexing by masks: each sample's
    ops before its hue step (slots 0-2), the hue of every jittered sample, then its ops after the
    hue step (slots 1-3). Six blends and one hue pass over the batch, against four hue passes
    for a plain slot-by-slot blend; the hue conversion is the costly op."""
    t_hue = (order == HUE).int().argmax(1)
    none = torch.full_like(order[:, 0], -1)
    for t in range(3):
        x = _blend_slot(x, torch.where(apply & (t < t_hue), order[:, t], none), factors)
    x = _pick(apply, adjust_hue(x, factors[HUE]), x)
    for t in range(1, 4):
        x = _blend_slot(x, torch.where(apply & (t > t_hue), order[:, t], none), factors)
    return x


def color_jitter(x, brightness, contrast, saturation, hue, p=1.0, generator=None):
    """torchvision's RandomApply(ColorJitter(...), p) per sample of the float batch x; returns the
    jittered batch (x itself may be overwritten). generator: on x's device, or None for that
    device's default generator (torch.manual_seed seeds it)."""
    params = jitter_params(len(x), brightness, contrast, saturation, hue, p, generator, x.device)
    return apply_jitter(x, *params)


def random_grayscale(x, p, generator=None):
    return _pick(_chance(len(x), p, generator, x.device), grayscale(x).expand_as(x), x)


def random_blur(x, sigma, p, generator=None):
    """The blur runs on every sample and the unblurred ones are kept: a blur of only the chosen
    samples would need their count on the host."""
    s = _uniform(len(x), sigma[0], sigma[1], generator, x.device)
    return _pick(_chance(len(x), p, generator, x.device), gaussian_blur(x, s), x)


def solarize(x, threshold=0.5):
    """PIL's ImageOps.solarize (threshold 128 of 255) on a float batch in [0, 1]: values at or above
    the threshold inverted."""
    return torch.where(x >= threshold, 1 - x, x)


def random_solarize(x, p, generator=None):
    return _pick(_chance(len(x), p, generator, x.device), solarize(x), x)


def augment(x, version, generator=None, view=0):
    """x: (B, 3, H, W) uint8 or float in [0, 1], already cropped and flipped. Returns the
    augmented, normalised float32 batch on x's device (x itself is not modified). version: 'v1',
    'v2', or None / 'none' (normalise only). generator: an optional torch.Generator on x's device
    for the random parameters; None draws from that device's default generator, which
    torch.manual_seed seeds. view: 0 or 1, which of v3's two different views (the other versions
    draw both views alike). Nothing is read back to the host: no step waits for the device here."""
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
    elif version == "v3":
        blur, solar = V3_VIEWS[view]
        x = color_jitter(x, 0.4, 0.4, 0.2, 0.1, p=0.8, generator=generator)
        x = random_grayscale(x, 0.2, generator)
        x = random_blur(x, (0.1, 2.0), p=blur, generator=generator)
        x = random_solarize(x, solar, generator) if solar else x
    return normalize_(x)
