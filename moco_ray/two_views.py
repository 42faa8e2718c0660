"""Both MoCo views of a sample from one JPEG decode, inside ffcv's compiled pipeline.

ffcv's stock RandomResizedCropRGBImageDecoder decodes the whole JPEG for every crop it cuts, so
two views of one image cost two decodes. `TwoViewRandomResizedCrop` decodes each image once and
cuts both views from that decode, each with its own RandomResizedCrop (ffcv's `get_random_crop`,
the same distribution as torchvision's RandomResizedCrop.get_params) and its own horizontal flip.
Its output per sample is (2, 3, H, W) uint8 (views=1: (1, 3, H, W), view q alone, for linear
evaluation): view q, then view k, each in torch's CHW layout (the
transpose from OpenCV's HWC, with the flip, happens here in the loader's threads: a float
conversion of channels-last views on the training thread cost 1.5-3x that of CHW ones).

DCT scaling. libjpeg-turbo can decode at 1/2, 1/4 or 1/8 of the stored size for a fraction of
the cost of a full decode (the inverse DCT is cut short). The decoder takes the smallest scale
1/d at which both crops are still at least DCT_MARGIN * d times the output in both directions, so
that the resize after the decode still shrinks by DCT_MARGIN or more. At 1/d a crop's edges snap
to the nearest multiple of d stored pixels (a view's area moves by under 1%, since the crop is
>= 2d x the output), and the recorded parameters are the snapped ones. Measured with
`bench/data.py --dct` (64 px views of 400x350 stored JPEGs, mean |difference| in grey levels): the
resize's own error (OpenCV INTER_AREA against torchvision's antialiased bilinear, same crop) is
1.53; a 1/d view differs from the full decode's by 0.88 (max 1.82) with DCT_MARGIN 2, but by 1.74
(max 3.26) with margin 1, i.e. 1/2 as soon as a crop is twice the output: beyond the resize's error.
At 224 px views of ImageNet-sized images no crop qualifies (it would need >= 896 px); it pays at
low training resolutions.

Memory per loader: batch x (2 x 3 x H x W) output + batch x (largest stored H x W x 3) decode
buffer, as ffcv's decoders (one decode buffer per sample of a batch, whatever d), + batch x
(H x W x 3) for the resized view before its transpose.

Test hook: with record=True each view gets one extra row (in its first plane) that holds its
parameters (i, j, h, w in stored pixels, flip, d) as little-endian uint16; `split_recorded` takes
them off.
"""
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

DCT_MARGIN = 2        # a crop decodes at 1/d only when it is >= DCT_MARGIN * d times the output
DENOMINATORS = (8, 4, 2)
PARAMS = ("i", "j", "h", "w", "flip", "d")


def dct_denominator(crop_h, crop_w, out_h, out_w, margin):
    """The largest d in 8, 4, 2 with crop >= margin * d * output in both directions, else 1."""
    for d in DENOMINATORS:
        if crop_h >= margin * d * out_h and crop_w >= margin * d * out_w:
            return d
    return 1


def scaled_span(start, size, d, full):
    """[start, start + size) of a stored side of `full` pixels, snapped to whole pixels of its 1/d
    decode: (lo, hi) in decoded pixels and (start, size) of the stored pixels they cover."""
    limit = (full + d - 1) // d
    lo = min((start + d // 2) // d, limit - 1)
    hi = max(min((start + size + d // 2) // d, limit), lo + 1)
    return lo, hi, lo * d, min(hi * d, full) - lo * d


def to_planes(view, planes, flip):
    """planes[c, r, x] = view[r, x, c], mirrored left-right if flip: (H, W, 3) -> (3, H, W)."""
    w = view.shape[1]
    for r in range(view.shape[0]):
        for x in range(w):
            src = w - 1 - x if flip else x
            for c in range(3):
                planes[c, r, x] = view[r, src, c]


def write_params(row, params):
    """Stores small non-negative ints as little-endian uint16 at the start of a uint8 row."""
    flat = row.reshape(-1)
    for k in range(len(params)):
        flat[2 * k] = params[k] & 255
        flat[2 * k + 1] = params[k] >> 8


def split_recorded(out):
    """(B, 2, 3, H + 1, W) uint8 of a record=True decoder -> (views (B, 2, 3, H, W),
    params (B, 2, len(PARAMS)) int64, in the order of PARAMS)."""
    out = np.asarray(out)
    raw = out[:, :, 0, -1, :2 * len(PARAMS)].astype(np.int64)
    return out[:, :, :, :-1], raw[..., 0::2] + 256 * raw[..., 1::2]


class TwoViewRandomResizedCrop(SimpleRGBImageDecoder):   # a decoder of RGBImageField, as ffcv's own
    """Decoder for ffcv's RGBImageField: two RandomResizedCrop + RandomHorizontalFlip views of each
    image from one (possibly DCT-scaled) decode. output_size: (H, W); scale, ratio: as
    torchvision's RandomResizedCrop. views=1: view q only, (1, 3, H, W) per sample (linear
    evaluation's training views: one crop, half the output)."""

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), dct_margin=DCT_MARGIN,
                 record=False, views=2):
        super().__init__()
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        self.views = views
        self.output_size = tuple(output_size)
        self.scale, self.ratio = np.array(scale, float), np.array(ratio, float)
        self.dct_margin, self.record = dct_margin, bool(record)
        if record and self.output_size[1] < 2 * len(PARAMS):
            raise ValueError(f"record needs an output width >= {2 * len(PARAMS)}")

    def declare_state_and_memory(self, previous_state):
        heights, widths = self.metadata["height"], self.metadata["width"]
        H, W = self.output_size
        shape = (self.views, 3, H + int(self.record), W)
        buffer = int(heights.max()) * int(widths.max()) * 3
        dtype = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                (AllocationQuery(shape, dtype), AllocationQuery((buffer,), dtype),
                 AllocationQuery((H, W, 3), dtype)))

    def generate_code(self):
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        crop_c, denom_c = Compiler.compile(get_random_crop), Compiler.compile(dct_denominator)
        span_c, planes_c = Compiler.compile(scaled_span), Compiler.compile(to_planes)
        write_c = Compiler.compile(write_params)
        jpg, (H, W), record = IMAGE_MODES["jpg"], self.output_size, self.record
        scale, ratio, views = self.scale, self.ratio, self.views
        margin = 1 << 30 if self.dct_margin is None else self.dct_margin   # None: never scale

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, buffers, resized = my_storage
            for ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[ix]]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                iq, jq, hq, wq = crop_c(height, width, scale, ratio)
                ik, jk, hk, wk = crop_c(height, width, scale, ratio)
                d = 1
                if field["mode"] == jpg:
                    d = denom_c(hq, wq, H, W, margin)
                    if views == 2:
                        d = min(d, denom_c(hk, wk, H, W, margin))
                    sh, sw = (height + d - 1) // d, (width + d - 1) // d
                    image = buffers[ix][:sh * sw * 3].reshape(sh, sw, 3)
                    imdecode_c(data, image, height, width, height, width, 0, 0, 1, d, False, False)
                else:
                    image = data.reshape(height, width, 3)
                for v in range(views):
                    i, j, h, w = (iq, jq, hq, wq) if v == 0 else (ik, jk, hk, wk)
                    r0, r1, i, h = span_c(i, h, d, height)
                    c0, c1, j, w = span_c(j, w, d, width)
                    resize_crop_c(image, r0, r1, c0, c1, resized[ix])
                    flip = np.random.rand() < 0.5
                    planes_c(resized[ix], destination[ix, v, :, :H], flip)
                    if record:
                        write_c(destination[ix, v, 0, H], np.array([i, j, h, w, int(flip), d]))
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
