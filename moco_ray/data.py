"""Data for MoCo: the elastic epoch order, the ffcv two-view loader, and the ImageFolder fallback.

A dataset path is either a converted directory (manifest.parquet + .beton shards, written by
`python -m data_prep.convert`) or an ImageFolder tree. Both give the same batches:

    train: (view_q, view_k, label, sample_id)   two independently augmented views of each sample
    eval:  (images, label, sample_id)           resize + center crop, every sample exactly once

Order. The rows of an epoch are `epoch_order(seed, epoch, n)`, a pure function of its arguments.
From position `start` on, the order is cut into global windows of batch_per_worker * world_size
rows; rank r takes the r-th slice of each full window and the final partial window is dropped.
After k steps, start + k * b * W rows of the epoch are consumed, so resuming from that position
with any other world size sees every row of the epoch exactly once.

ffcv reads one .beton file per Loader, so a converted dataset with several shards gets one Loader
per shard, all sharing one numba compilation per pipeline and process (see _shard_loader). Every shard's Loader
is fed, through a registered TraversalOrder, exactly this rank's rows that live in that shard, in
epoch order, and the batches are reassembled in the epoch order from their outputs. Each shard
that a step reads from keeps its own prefetch buffers (about 4 x max(16, b / shards) samples), so
a few shards (1-16) suit training better than many.
"""
import copy
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from data_prep import manifest as M
from moco_ray.augment import augment

CROP_SCALE = (0.2, 1.0)      # MoCo's RandomResizedCrop scale
EVAL_CROP = 224 / 256        # center crop / resize, as the ImageNet evaluation protocol


# ---------------------------------------------------------------------------------------------
# order


def epoch_order(seed, epoch, n):
    """The row order of an epoch: a permutation of range(n), a pure function of its arguments."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(int(n))


def rank_indices(order, start, batch_per_worker, rank, world_size):
    """The rows rank `rank` reads from position `start` of `order` on, one batch after another."""
    b, W = int(batch_per_worker), int(world_size)
    if b < 1 or W < 1 or not 0 <= rank < W:
        raise ValueError(f"bad slice: batch_per_worker={b}, rank={rank}, world_size={W}")
    if not 0 <= start <= len(order):
        raise ValueError(f"start={start} is outside the epoch of {len(order)} samples")
    rest = np.asarray(order)[start:]
    steps = len(rest) // (b * W)
    return rest[: steps * b * W].reshape(steps, W, b)[:, rank].reshape(-1)


def eval_rows(n, rank, world_size):
    """Contiguous, disjoint slices that together cover range(n)."""
    return np.array_split(np.arange(n), world_size)[rank]


def class_subset(labels, per_class, seed=0):
    """The rows (ascending) of a seeded random choice of min(per_class, |class c|) samples of every
    class c: a pure function of its arguments, so the same for every world size. O(n) memory,
    O(n log n) time."""
    labels = np.asarray(labels)
    shuffled = np.random.default_rng([int(seed), len(labels)]).permutation(len(labels))
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]   # classes in turn, shuffled inside
    sorted_labels = labels[by_class]
    place = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels)   # place in its class
    return np.sort(by_class[place < per_class])


# ---------------------------------------------------------------------------------------------
# datasets


def _is_converted(path):
    return (Path(path) / M.MANIFEST).exists()


def _check(path):
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no such dataset directory: {path}")
    return path


@lru_cache(maxsize=8)
def _image_folder(path):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(path)
    except FileNotFoundError as e:
        raise ValueError(f"{path} is neither a converted dataset (no {M.MANIFEST}) nor an "
                         f"ImageFolder tree: {e}") from None


def dataset_info(path):
    """dict(n, classes, num_classes) of a converted dataset or an ImageFolder tree."""
    path = _check(path)
    if _is_converted(path):
        meta = M.read_metadata(path)
        n, classes = meta["n"], meta["classes"]
        missing = [s["file"] for s in meta["shards"] if not (path / s["file"]).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: shard {missing[0]} listed in the manifest is missing")
    else:
        folder = _image_folder(str(path.resolve()))
        n, classes = len(folder.samples), list(folder.classes)
    return {"n": n, "classes": classes, "num_classes": len(classes)}


def dataset_labels(path):
    """The label of every row, without decoding an image: (n,) int64."""
    path = _check(path)
    if _is_converted(path):
        return _manifest(str(path), os.stat(path / M.MANIFEST).st_mtime_ns).labels
    return np.asarray(_image_folder(str(path.resolve())).targets, dtype=np.int64)


def _default_workers():
    return len(os.sched_getaffinity(0))


class Batches:
    """An iterable of batches with a length (the number of batches one iteration yields)."""

    def __init__(self, steps, make_iter):
        self.steps, self._make_iter = steps, make_iter

    def __len__(self):
        return self.steps

    def __iter__(self):
        return self._make_iter()


def make_train_loader(path, *, seed, epoch, start, batch_per_worker, rank, world_size, res,
                      aug="v2", device="cpu", num_workers=None, crop_min=CROP_SCALE[0]):
    """Two augmented views per sample: yields (view_q, view_k, label, sample_id), the views float32
    NCHW normalised on `device`, label and sample_id int64 on the CPU. aug: 'v1', 'v2' or None.
    len() = the steps left in this epoch from `start` for this world size. crop_min: the smallest
    crop area of RandomResizedCrop (MoCo: 0.2)."""
    path = _check(path)
    n = dataset_info(path)["n"]
    b = int(batch_per_worker)
    rows = rank_indices(epoch_order(seed, epoch, n), start, b, rank, world_size)
    sizes = [b] * (len(rows) // b)
    num_workers = _default_workers() if num_workers is None else int(num_workers)
    device = torch.device(device)

    def batches():
        for (q, k), label, sid in _batches(path, rows, sizes, "train", res, num_workers, device,
                                                 (crop_min, 1.0)):
            q, k = (augment(v.to(device, non_blocking=True), aug) for v in (q, k))   # independent draws
            yield q, k, label, sid

    return Batches(len(sizes), batches)


def make_eval_loader(path, *, batch_size, rank, world_size, res, device="cpu", num_workers=None,
                     per_class=0, seed=0):
    """Deterministic, un-augmented batches (images, label, sample_id) of this rank's slice, images
    resized and center-cropped to res, normalised on `device`; the ranks' slices together cover
    every sample exactly once. per_class > 0: only the samples of class_subset(labels, per_class,
    seed), the same subset for every world size."""
    path = _check(path)
    if per_class:
        rows = np.array_split(class_subset(dataset_labels(path), per_class, seed), world_size)[rank]
    else:
        rows = eval_rows(dataset_info(path)["n"], rank, world_size)
    sizes = [min(batch_size, len(rows) - i) for i in range(0, len(rows), batch_size)]
    num_workers = _default_workers() if num_workers is None else int(num_workers)
    device = torch.device(device)

    def batches():
        for (images,), label, sid in _batches(path, rows, sizes, "eval", res, num_workers, device):
            yield augment(images.to(device, non_blocking=True), None), label, sid

    return Batches(len(sizes), batches)


def _batches(path, rows, sizes, kind, res, num_workers, device, scale=CROP_SCALE):
    """([uint8 views...], label, sample_id) for consecutive slices of `rows` of the given sizes.
    From ffcv the views may be its own buffers, valid until the next batch is asked for: use them
    (convert, or copy to the device) before that."""
    if _is_converted(path):
        return _ffcv_batches(path, rows, sizes, kind, res, num_workers, device, scale)
    return _folder_batches(path, rows, sizes, kind, res, num_workers, device, scale)


# ---------------------------------------------------------------------------------------------
# ffcv


@lru_cache(maxsize=None)
def _feed_order():
    from ffcv.loader.loader import ORDER_MAP
    from ffcv.traversal_order.base import TraversalOrder

    class FeedOrder(TraversalOrder):
        """Yields the order set on it before each iteration (ffcv calls sample_order in iter())."""
        order = None

        def sample_order(self, epoch):
            return self.indices if self.order is None else self.order

    ORDER_MAP[FeedOrder] = FeedOrder    # Loader(order=...) only accepts registered orders
    return FeedOrder


def _pipelines(kind, res, scale=CROP_SCALE):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.transforms import ToTensor, ToTorchImage

    from moco_ray.two_views import TwoViewRandomResizedCrop

    ints = {M.LABEL: [IntDecoder(), ToTensor()], M.ID: [IntDecoder(), ToTensor()]}
    if kind == "eval":
        return {M.IMAGE: [CenterCropRGBImageDecoder((res, res), ratio=EVAL_CROP), ToTensor(),
                          ToTorchImage()], **ints}

    # both views from one decode: (B, 2, 3, res, res) uint8, view q then view k (see two_views)
    return {M.IMAGE: [TwoViewRandomResizedCrop((res, res), scale=scale), ToTensor()], **ints}


def _stat_key(path):
    st = os.stat(path)
    return str(path), st.st_ino, st.st_mtime_ns


_SHARDS = {}       # stat key of a shard -> (ffcv Reader, OSCacheManager)
_TEMPLATES = {}    # pipeline -> (ffcv Loader, the largest image area it can decode)


def _shard_state(path):
    from ffcv.memory_managers import OSCacheManager
    from ffcv.reader import Reader

    key = _stat_key(path)
    if key not in _SHARDS:
        reader = Reader(str(path))
        _SHARDS[key] = reader, OSCacheManager(reader)
    return _SHARDS[key]


def _image_area(reader):
    meta = reader.metadata[f"f{reader.field_names.index(M.IMAGE)}"]
    return int(meta["height"].max()) * int(meta["width"].max())


def _shard_loader(man, shard, order, kind, res, chunk, num_workers, scale=CROP_SCALE):
    """An ffcv Loader that reads `order` (rows of one shard), `chunk` rows at a time.

    numba compiles a Loader's pipeline on first use, seconds to minutes. The compiled code does
    not depend on the file or the batch size, so one template Loader per pipeline serves every
    shard of every dataset in this process: a shard's Loader is a copy of the template with that
    shard's reader, memory manager, order and batch size. The one thing taken from the file a
    Loader is built on is the size of the decode buffer (its largest height x largest width), so
    the template is rebuilt on a bigger shard when one needs more."""
    import numba
    from ffcv.loader import Loader

    num_workers = min(max(1, num_workers), numba.config.NUMBA_NUM_THREADS)   # numba refuses more
    paths = [man.shard_path(i) for i in range(len(man.shards))]
    area = max(_image_area(_shard_state(p)[0]) for p in paths)
    key = (kind, res, num_workers, tuple(scale))
    if key not in _TEMPLATES or _TEMPLATES[key][1] < area:
        big = max(paths, key=lambda p: _image_area(_shard_state(p)[0]))
        torch_threads = torch.get_num_threads()
        template = Loader(str(big), batch_size=chunk, num_workers=num_workers,
                          order=_feed_order(), pipelines=_pipelines(kind, res, scale),
                          drop_last=False, batches_ahead=2)
        torch.set_num_threads(torch_threads)   # ffcv sets torch's thread count to its own
        _TEMPLATES[key] = template, area
    loader = copy.copy(_TEMPLATES[key][0])
    loader.fname = str(paths[shard])
    loader.reader, loader.memory_manager = _shard_state(paths[shard])
    loader.batch_size = chunk
    loader.traversal_order = _feed_order()(loader)
    loader.traversal_order.order = order
    loader.first_traversal_order = order       # len(loader), and so what iter() yields, counts from it
    return loader


class _ShardStream:
    """The samples of one shard, in the order given, as ffcv decodes them (lazily started).

    ffcv writes batches into a ring of batches_ahead + 2 buffers: the batch next() returned is
    overwritten once next() is called again. take() hands out views of that buffer without a copy
    (a copy of a 64 x 2 x 224 x 224 x 3 batch is a pass over 19 MB on the training thread), so what
    it returns is valid until the next take() on this stream; whatever must outlive that (samples
    kept for the next take, parts joined across batches) is copied."""

    def __init__(self, loader):
        self.loader = loader
        self.it, self.parts = None, []   # parts: copies, kept from an earlier take
        self.names = list(loader.pipeline_specs)   # the order of ffcv's outputs
        self.torch_threads = torch.get_num_threads()

    def take(self, m):
        """The next m samples: a dict name -> tensor, valid until the next take()."""
        parts, self.parts = self.parts, []
        have, fresh = sum(len(p[M.ID]) for p in parts), None   # fresh: the newest batch, ffcv's buffer
        while have < m:
            if self.it is None:
                self.it = iter(self.loader)
            self._wait_for_batch()
            if fresh is not None:
                parts.append(_copy(fresh))   # the next() below may overwrite its buffer
            fresh = dict(zip(self.names, next(self.it)))
            # ffcv sets torch's (process-wide) thread count to its own worker count, also from
            # its producer thread: put the trainer's back once that thread is running
            if torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
            have += len(fresh[M.ID])
        if fresh is not None:
            parts.append(fresh)
        out = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        rest = {k: v[m:] for k, v in out.items()}
        if len(rest[M.ID]):
            self.parts = [_copy(rest) if out is fresh else rest]
        return {k: v[:m] for k, v in out.items()}

    def _wait_for_batch(self):
        # ffcv's reader thread dies on an error (its traceback is printed) and leaves next()
        # waiting forever: wait here instead, and notice
        q = self.it.output_queue
        with q.not_empty:
            while not q.queue:
                if not self.it.is_alive():
                    raise RuntimeError(f"ffcv stopped reading {self.loader.fname} (see the error above)")
                q.not_empty.wait(1.0)

    def close(self):
        if self.it is not None:
            self.it.close()


def _copy(part):
    return {k: v.clone() for k, v in part.items()}


def _ffcv_batches(path, rows, sizes, kind, res, num_workers, device, scale=CROP_SCALE):
    man = _manifest(str(path), os.stat(Path(path) / M.MANIFEST).st_mtime_ns)
    shard, local = man.shard[rows], man.index[rows]
    n_shards = len(man.shards)
    step = max(sizes, default=1)
    chunk = step if n_shards == 1 else max(16, -(-step // n_shards))
    streams = {s: _ShardStream(_shard_loader(man, s, local[shard == s].astype(np.uint64), kind, res,
                                             chunk, num_workers, scale))
               for s in np.unique(shard)}
    pin = device.type == "cuda"   # pinned host memory: the copy to the GPU overlaps
    try:
        pos = 0
        for size in sizes:
            sh = shard[pos:pos + size]
            want = man.ids[rows[pos:pos + size]]
            present = np.unique(sh)
            if len(present) == 1:
                out = streams[present[0]].take(size)
            else:   # interleave the shards' samples back into the epoch order
                out = None
                for s in present:
                    where = torch.from_numpy(np.flatnonzero(sh == s))
                    got = streams[s].take(len(where))
                    if out is None:
                        out = {k: torch.empty((size, *v.shape[1:]), dtype=v.dtype) for k, v in got.items()}
                    for k, v in got.items():
                        out[k][where] = v
            sid, label = out[M.ID].view(-1).clone(), out[M.LABEL].view(-1).clone()   # kept by callers
            if not np.array_equal(sid.numpy(), want):
                raise RuntimeError(f"{path}: the shards do not match the manifest "
                                   f"(expected ids {want[:5]}..., read {sid[:5].tolist()}...)")
            pos += size
            images = out[M.IMAGE].pin_memory() if pin else out[M.IMAGE]
            # train: (B, 2, 3, H, W) -> view q, view k, each (B, 3, H, W)
            yield (images,) if kind == "eval" else images.unbind(1), label, sid
    finally:
        for stream in streams.values():
            stream.close()


@lru_cache(maxsize=8)
def _manifest(path, mtime_ns):
    return M.read_manifest(path)


# ---------------------------------------------------------------------------------------------
# ImageFolder fallback


class _FolderViews(torch.utils.data.Dataset):
    """ImageFolder samples as (views..., label, sample_id), views uint8 CHW tensors."""

    def __init__(self, folder, views):
        self.folder, self.views = folder, views

    def __len__(self):
        return len(self.folder.samples)

    def __getitem__(self, i):
        path, label = self.folder.samples[i]
        img = self.folder.loader(path)
        return [t(img) for t in self.views], label, i


def _folder_transforms(kind, res, scale=CROP_SCALE):
    from torchvision.transforms import v2 as T

    if kind == "eval":
        return [T.Compose([T.Resize(round(res / EVAL_CROP)), T.CenterCrop(res), T.PILToTensor()])]
    return [T.Compose([T.RandomResizedCrop(res, scale=scale, antialias=True),
                       T.RandomHorizontalFlip(), T.PILToTensor()]) for _ in range(2)]


def _folder_batches(path, rows, sizes, kind, res, num_workers, device, scale=CROP_SCALE):
    if not sizes:
        return
    folder = _image_folder(str(Path(path).resolve()))
    dataset = _FolderViews(folder, _folder_transforms(kind, res, scale))
    # rows are already this rank's, in order: the sampler just replays them (sizes: all equal
    # but the last)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=sizes[0], sampler=rows[:sum(sizes)].tolist(), num_workers=num_workers,
        drop_last=False, pin_memory=device.type == "cuda")
    for views, label, sid in loader:
        yield views, label.long(), sid.long()
