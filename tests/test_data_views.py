"""Both views from one decode (moco_ray.two_views) on a real .beton: each view is torchvision's
RandomResizedCrop + flip of the decoded image with the parameters the decoder used (its record
hook), the two views are independent, and the crop statistics are torchvision's.

The images are smooth random textures of 90-220 px stored at source resolution, half as JPEG and
half raw (write mode 'proportion'), cut to 16 px views: big enough that many crops take the
DCT-scaled decode (d = 2 or 4), small enough for a few seconds of work."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import v2 as T

from conftest_data import beton_rows
from data_prep.convert import convert
from moco_ray.two_views import PARAMS, TwoViewRandomResizedCrop, split_recorded

R = 16
SCALE = (0.2, 1.0)
EPOCHS = 12


def texture(rng):
    h, w = (int(x) for x in rng.integers(90, 220, 2))
    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90), (16, 30)):
        noise = rng.uniform(-amp, amp, (cells, cells, 3)).astype(np.float32)
        img += np.stack([np.asarray(Image.fromarray(noise[..., c], mode="F").resize((w, h), Image.BICUBIC))
                         for c in range(3)], -1)
    return Image.fromarray((img + 128).clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(stored images by id, views (n, 2, R, R, 3) as HWC, params (n, 2, len(PARAMS)), ids (n,))
    over EPOCHS passes of the dataset through one recording decoder."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    root = tmp_path_factory.mktemp("textures")
    rng = np.random.default_rng(0)
    for k in range(40):
        (root / "src" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        texture(rng).save(root / "src" / f"c{k % 2}" / f"{k:03d}.jpg", quality=95)
    convert(root / "src", root / "ffcv", max_resolution=512, write_mode="proportion", workers=1,
            progress=False)
    shard = root / "ffcv" / "shard-00000.beton"
    ids, _, images = beton_rows(shard)
    loader = Loader(str(shard), batch_size=20, num_workers=2, order=OrderOption.RANDOM, pipelines={
        "image": [TwoViewRandomResizedCrop((R, R), scale=SCALE, record=True), ToTensor()],
        "label": [IntDecoder(), ToTensor()], "id": [IntDecoder(), ToTensor()]})
    views, params, sids = [], [], []
    for _ in range(EPOCHS):
        for out, _, sid in loader:
            v, p = split_recorded(out.numpy())
            views.append(v.transpose(0, 1, 3, 4, 2).copy())
            params.append(p)
            sids.append(sid.numpy().reshape(-1).copy())
    by_id = dict(zip(ids.tolist(), images))
    return by_id, np.concatenate(views), np.concatenate(params), np.concatenate(sids)


def field(params, name):
    return params[..., PARAMS.index(name)]


def reference(img, p):
    """torchvision's resized crop (antialiased bilinear) with parameters p, flipped if p says so."""
    i, j, h, w, flip, _ = (int(x) for x in p)
    x = TF.resized_crop(torch.from_numpy(img.copy()).permute(2, 0, 1), i, j, h, w, [R, R], antialias=True)
    return (TF.horizontal_flip(x) if flip else x).permute(1, 2, 0).numpy().astype(float)


def area_resize(img, p):
    """The same crop with the resize ffcv uses (OpenCV's INTER_AREA), flipped if p says so."""
    import cv2

    i, j, h, w, flip = (int(x) for x in p[:5])
    y = cv2.resize(np.ascontiguousarray(img[i:i + h, j:j + w]), (R, R), interpolation=cv2.INTER_AREA)
    return (y[:, ::-1] if flip else y).astype(float)


def test_each_view_is_a_random_resized_crop_of_the_decoded_image(recorded):
    images, views, params, ids = recorded
    d = field(params, "d")
    assert set(np.unique(d)) >= {1, 2}, "the fixture should exercise the DCT-scaled decode"
    errors = {"view": [], "resize": [], "unflipped": []}
    for n in range(0, len(ids), 3):
        img = images[int(ids[n])]
        for v in range(2):
            p, got = params[n, v], views[n, v].astype(float)
            i, j, h, w = p[:4]
            assert 0 <= i and i + h <= img.shape[0] and 0 <= j and j + w <= img.shape[1]
            ref = reference(img, p)
            errors["view"].append(np.abs(got - ref).mean())
            errors["resize"].append(np.abs(area_resize(img, p) - ref).mean())   # the resize's own error
            errors["unflipped"].append(np.abs(got[:, ::-1] - ref).mean())
    view, resize = np.array(errors["view"]), np.array(errors["resize"])
    # within the difference between two good resizers, plus the JPEG decoders' (libjpeg-turbo's
    # fast DCT against PIL: about one grey level)
    assert view.mean() < resize.mean() + 1.0 and np.all(view < resize + 3.0), (view.mean(), resize.mean())
    assert np.mean(errors["unflipped"]) > 3 * view.mean()      # the recorded flip is the one applied


def test_dct_scaled_views_match_the_full_decode(recorded):
    images, views, params, ids = recorded
    for scaled in (False, True):
        n, v = np.nonzero((field(params, "d") > 1) == scaled)
        err = [np.abs(views[a, b] - area_resize(images[int(ids[a])], params[a, b])).mean()
               for a, b in zip(n[:200], v[:200])]
        assert np.mean(err) < 1.5, (scaled, np.mean(err))


def test_the_two_views_are_independent(recorded):
    _, views, params, _ = recorded
    crop_q, crop_k = params[:, 0, :4], params[:, 1, :4]
    assert (crop_q != crop_k).any(axis=1).mean() > 0.99
    flip = field(params, "flip")
    assert 0.4 < flip.mean() < 0.6
    assert 0.4 < (flip[:, 0] == flip[:, 1]).mean() < 0.6
    assert (np.abs(views[:, 0].astype(int) - views[:, 1]).max(axis=(1, 2, 3)) > 8).mean() > 0.95


def torchvision_crops(sizes, scale, seed=0):
    torch.manual_seed(seed)
    crops = [T.RandomResizedCrop.get_params(torch.empty(1, h, w), scale, (3 / 4, 4 / 3)) for h, w in sizes]
    return np.array(crops)


def crop_statistics(crops, sizes):
    i, j, h, w = np.asarray(crops, float).T
    H, W = np.asarray(sizes, float).T
    return {"scale": h * w / (H * W), "log_ratio": np.log(w / h),
            "centre_y": (i + h / 2) / H, "centre_x": (j + w / 2) / W}


def test_crop_statistics_match_torchvision(recorded):
    images, _, params, ids = recorded
    crops = params[..., :4].reshape(-1, 4)
    sizes = [images[int(s)].shape[:2] for s in np.repeat(ids, 2)]
    ours = crop_statistics(crops, sizes)
    theirs = crop_statistics(torchvision_crops(sizes, SCALE), sizes)
    for name in ours:
        assert ks_2samp(ours[name], theirs[name]).pvalue > 1e-3, name
    # the test tells distributions apart: MoCo's scale against torchvision's default
    other = crop_statistics(torchvision_crops(sizes, (0.08, 1.0), seed=1), sizes)
    assert ks_2samp(ours["scale"], other["scale"]).pvalue < 1e-6
