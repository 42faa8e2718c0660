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
a few shards (1-16) suit training better than many. Opening an epoch stats every shard file twice
(the largest image area of the dataset, then each shard's reader): O(shards) stats per epoch and
worker, 2,048 for 1,024 shards (a few ms locally, about a second on a network file system).

Assembly. A batch leaves the loader as one dense uint8 tensor per view, (b, 3, H, W), allocated for
it and filled with one copy from the shards' decode buffers (`assemble`): pinned when the device is
CUDA (`pinned_for`), so `.to(device, non_blocking=True)` is an asynchronous DMA and not a hidden
pageable copy of a strided view. At W=64, B=4096 (b=64, 224 px, two views): 19.3 MB per batch, one
memcpy of it on the training thread (`bench/data.py` prints it against a plain copy of the same
bytes), and a pinned pool of a few batches per worker.
"""
import copy
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from data_prep import manifest
from moco_ray.augment import augment

CROP_SCALE = (0.2, 1.0)      # MoCo's RandomResizedCrop scale


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
    return (Path(path) / manifest.MANIFEST).exists()


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
        raise ValueError(f"{path} is neither a converted dataset (no {manifest.MANIFEST}) nor an "
                         f"ImageFolder tree: {e}") from None


def dataset_info(path):
    """dict(n, classes, num_classes) of a converted dataset or an ImageFolder tree."""
    path = _check(path)
    if _is_converted(path):
        meta = manifest.read_metadata(path)
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
        return _manifest(str(path), os.stat(path / manifest.MANIFEST).st_mtime_ns).labels
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
                      aug="v2", device="cpu", num_workers=None, crop_min=CROP_SCALE[0], views=2,
                      raw_k=False):
    """Two augmented views per sample: yields (view_q, view_k, label, sample_id), the views float32
    NCHW normalised on `device`, label and sample_id int64 on the CPU. aug: 'v1', 'v2', 'v3' (the
    views are v3's view 0 and view 1) or None.
    len() = the steps left in this epoch from `start` for this world size. crop_min: the smallest
    crop area of RandomResizedCrop (MoCo: 0.2).
    views=1: one view per sample, (view, label, sample_id): one crop, half the decode output
    (linear evaluation). raw_k: view k stays uint8 (on `device`) and un-augmented, for a step that
    augments it after the shuffle of shuffled BN (moco_ray.step.MoCo: its all_to_all then moves 1
    byte per pixel, not 4)."""
    path = _check(path)
    n = dataset_info(path)["n"]
    b = int(batch_per_worker)
    rows = rank_indices(epoch_order(seed, epoch, n), start, b, rank, world_size)
    sizes = [b] * (len(rows) // b)
    num_workers = _default_workers() if num_workers is None else int(num_workers)
    device = torch.device(device)

    def batches():
        for host, label, sid in _batches(path, rows, sizes, "train", res, num_workers, device,
                                         (crop_min, 1.0), views):
            on_device = [v.to(device, non_blocking=True) for v in host]
            keep = 1 if raw_k else len(on_device)   # raw_k: view k as it came
            yield (*(augment(v, aug, view=i) for i, v in enumerate(on_device[:keep])), *on_device[keep:], label,
                   sid)   # independent draws

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


def _batches(path, rows, sizes, kind, res, num_workers, device, scale=CROP_SCALE, views=2):
    """((uint8 views...), label, sample_id) for consecutive slices of `rows` of the given sizes: the
    host tensors that go to `device`, each view dense and its own (pinned for CUDA, see
    pinned_for). views: of a training sample (eval: always 1)."""
    if _is_converted(path):
        return _ffcv_batches(path, rows, sizes, kind, res, num_workers, device, scale, views)
    return _folder_batches(path, rows, sizes, kind, res, num_workers, device, scale, views)


def pinned_for(device):
    """Whether a batch's host tensors are allocated in pinned memory for `device`: for CUDA, so that
    the copy to the GPU is asynchronous (from pageable memory torch stages it synchronously)."""
    return torch.device(device).type == "cuda"


class BatchAssembly:
    """One batch put together from the shards' samples in tensors of its own: each image view a
    dense (size, 3, H, W) uint8 tensor (the views: one allocation, pinned with pin_memory), label
    and sample id (size,) int64. Every byte is copied once, when put() gets it: each run of
    consecutive positions is one numpy slice assignment for all views (numpy's per-call cost is a
    fraction of torch's: the ~60 runs of a batch of 64 from 16 shards cost about one plain copy of
    the batch, see bench/data.py)."""

    def __init__(self, size, pin_memory=False):
        self.size, self.pin_memory, self.images, self._dst = size, pin_memory, None, None
        self.ints = {k: torch.empty(size, dtype=torch.int64) for k in (manifest.LABEL, manifest.ID)}

    def put(self, pos, part):
        """Samples at positions pos (ascending) of the batch: part, a dict name -> tensor of
        len(pos) rows as ffcv yields them (image (m, V, 3, H, W) for training, (m, 3, H, W) eval)."""
        images = part[manifest.IMAGE] if part[manifest.IMAGE].dim() == 5 else part[manifest.IMAGE].unsqueeze(1)
        if self.images is None:
            self._allocate(images)
        src = images.numpy().swapaxes(0, 1)        # (V, m, 3, H, W)
        breaks = [0, *(np.flatnonzero(np.diff(pos) != 1) + 1), len(pos)]
        for a, b in zip(breaks[:-1], breaks[1:]):
            self._dst[:, pos[a]:pos[a] + b - a] = src[:, a:b]
        for k, v in self.ints.items():
            v.numpy()[pos] = part[k].numpy().reshape(-1)

    def _allocate(self, images):
        _, V, C, H, W = images.shape   # (m, V, 3, H, W)
        if _channels_last(images[:, 0]):   # eval: ffcv's ToTorchImage permutes HWC into NCHW; kept
            out = torch.empty((V, self.size, H, W, C), dtype=images.dtype, pin_memory=self.pin_memory)
            out = out.permute(0, 1, 4, 2, 3)
        else:
            out = torch.empty((V, self.size, C, H, W), dtype=images.dtype, pin_memory=self.pin_memory)
        self.images, self._dst = out.unbind(0), out.numpy()

    def result(self):
        """((views...), label, sample_id)."""
        return self.images, self.ints[manifest.LABEL], self.ints[manifest.ID]


def assemble(pieces, size, pin_memory=False):
    """BatchAssembly of (positions, part) pieces: ((views...), label, sample_id)."""
    batch = BatchAssembly(size, pin_memory)
    for pos, part in pieces:
        batch.put(pos, part)
    return batch.result()


def _channels_last(view):
    """Whether a (m, 3, H, W) view's rows are laid out channels-last (H, W, 3)."""
    return view.shape[1] > 1 and not view.is_contiguous() and view[:1].is_contiguous(memory_format=torch.channels_last)


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


def _pipelines(kind, res, scale=CROP_SCALE, views=2):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.transforms import ToTensor, ToTorchImage

    from moco_ray.two_views import TwoViewRandomResizedCrop

    ints = {manifest.LABEL: [IntDecoder(), ToTensor()], manifest.ID: [IntDecoder(), ToTensor()]}
    if kind == "eval":
        return {manifest.IMAGE: [CenterCropRGBImageDecoder((res, res), ratio=manifest.EVAL_CROP), ToTensor(),
                          ToTorchImage()], **ints}

    # both views from one decode: (B, 2, 3, res, res) uint8, view q then view k (see two_views)
    return {manifest.IMAGE: [TwoViewRandomResizedCrop((res, res), scale=scale, views=views), ToTensor()], **ints}


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
    meta = reader.metadata[f"f{reader.field_names.index(manifest.IMAGE)}"]
    return int(meta["height"].max()) * int(meta["width"].max())


def _largest_area(man):
    """The largest image area (height x width) of a dataset's shards, and the shard that has it:
    one stat of every shard file."""
    return max((_image_area(_shard_state(man.shard_path(i))[0]), i) for i in range(len(man.shards)))


def _shard_loader(man, shard, order, kind, res, chunk, num_workers, scale=CROP_SCALE, views=2,
                  largest=None):
    """An ffcv Loader that reads `order` (rows of one shard), `chunk` rows at a time. largest:
    _largest_area(man), computed once for all of an epoch's shards (else here: O(shards) stats).

    numba compiles a Loader's pipeline on first use, seconds to minutes. The compiled code does
    not depend on the file or the batch size, so one template Loader per pipeline serves every
    shard of every dataset in this process: a shard's Loader is a copy of the template with that
    shard's reader, memory manager, order and batch size. The one thing taken from the file a
    Loader is built on is the size of the decode buffer (its largest height x largest width), so
    the template is rebuilt on a bigger shard when one needs more."""
    import numba
    from ffcv.loader import Loader

    num_workers = min(max(1, num_workers), numba.config.NUMBA_NUM_THREADS)   # numba refuses more
    area, big = largest or _largest_area(man)
    key = (kind, res, num_workers, tuple(scale), views)
    if key not in _TEMPLATES or _TEMPLATES[key][1] < area:
        torch_threads = torch.get_num_threads()
        template = Loader(str(man.shard_path(big)), batch_size=chunk, num_workers=num_workers,
                          order=_feed_order(), pipelines=_pipelines(kind, res, scale, views),
                          drop_last=False, batches_ahead=2)
        torch.set_num_threads(torch_threads)   # ffcv sets torch's thread count to its own
        _TEMPLATES[key] = template, area
    loader = copy.copy(_TEMPLATES[key][0])
    loader.fname = str(man.shard_path(shard))
    loader.reader, loader.memory_manager = _shard_state(man.shard_path(shard))
    loader.batch_size = chunk
    loader.traversal_order = _feed_order()(loader)
    loader.traversal_order.order = order
    loader.first_traversal_order = order       # len(loader), and so what iter() yields, counts from it
    return loader


class _ShardStream:
    """The samples of one shard, in the order given, as ffcv decodes them (lazily started).

    ffcv writes batches into a ring of batches_ahead + 2 buffers: the batch next() returned is
    overwritten once next() is called again. take_into() hands out views of that buffer without a
    copy, each before it asks ffcv for another batch; what is left of ffcv's batch stays a view for
    the next take, which uses it before it calls next() again."""

    def __init__(self, loader):
        self.loader = loader
        self.it, self.rest = None, None   # rest: what is left of ffcv's newest batch
        self.names = list(loader.pipeline_specs)   # the order of ffcv's outputs
        self.torch_threads = torch.get_num_threads()

    def take_into(self, m, consume):
        """consume(part, i) for the next m samples, part by part (dicts name -> tensor, in order; i:
        the samples handed out before it), each part valid only until consume returns."""
        i = 0
        while i < m:
            if self.rest is None:
                self.rest = self._next()
            n = len(self.rest[manifest.ID])
            used = min(m - i, n)
            consume({k: v[:used] for k, v in self.rest.items()}, i)
            self.rest = {k: v[used:] for k, v in self.rest.items()} if used < n else None
            i += used

    def take(self, m):
        """The next m samples: a dict name -> tensor, a copy of their own."""
        parts = []
        self.take_into(m, lambda part, _: parts.append(_copy(part)))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _next(self):
        if self.it is None:
            self.it = iter(self.loader)
        self._wait_for_batch()
        batch = dict(zip(self.names, next(self.it)))
        # ffcv sets torch's (process-wide) thread count to its own worker count, also from its
        # producer thread: put the trainer's back once that thread is running
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        return batch

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


def _ffcv_batches(path, rows, sizes, kind, res, num_workers, device, scale=CROP_SCALE, views=2):
    man = _manifest(str(path), os.stat(Path(path) / manifest.MANIFEST).st_mtime_ns)
    shard, local = man.shard[rows], man.index[rows]
    step = max(sizes, default=1)
    chunk = step if len(man.shards) == 1 else max(16, -(-step // len(man.shards)))
    largest = _largest_area(man)
    streams = {s: _ShardStream(_shard_loader(man, s, local[shard == s].astype(np.uint64), kind, res,
                                             chunk, num_workers, scale, views, largest))
               for s in np.unique(shard)}
    pin = pinned_for(device)
    try:
        pos = 0
        for size in sizes:
            # the shards' samples, back in the epoch order
            batch, sh = BatchAssembly(size, pin), shard[pos:pos + size]
            for s in np.unique(sh):
                where = np.flatnonzero(sh == s)
                streams[s].take_into(len(where), lambda part, i, batch=batch, where=where:
                                     batch.put(where[i:i + len(part[manifest.ID])], part))
            images, label, sid = batch.result()
            want = man.ids[rows[pos:pos + size]]
            if not np.array_equal(sid.numpy(), want):
                raise RuntimeError(f"{path}: the shards do not match the manifest "
                                   f"(expected ids {want[:5]}..., read {sid[:5].tolist()}...)")
            pos += size
            yield images, label, sid
    finally:
        for stream in streams.values():
            stream.close()


@lru_cache(maxsize=8)
def _manifest(path, mtime_ns):
    return manifest.read_manifest(path)


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


def _folder_transforms(kind, res, scale=CROP_SCALE, views=2):
    from torchvision.transforms import v2 as T

    if kind == "eval":
        return [T.Compose([T.Resize(round(res / manifest.EVAL_CROP)), T.CenterCrop(res), T.PILToTensor()])]
    return [T.Compose([T.RandomResizedCrop(res, scale=scale, antialias=True),
                       T.RandomHorizontalFlip(), T.PILToTensor()]) for _ in range(views)]


def _folder_batches(path, rows, sizes, kind, res, num_workers, device, scale=CROP_SCALE, views=2):
    if not sizes:
        return
    folder = _image_folder(str(Path(path).resolve()))
    dataset = _FolderViews(folder, _folder_transforms(kind, res, scale, views))
    # rows are already this rank's, in order: the sampler just replays them (sizes: all equal
    # but the last)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=sizes[0], sampler=rows[:sum(sizes)].tolist(), num_workers=num_workers,
        drop_last=False, pin_memory=pinned_for(device))
    for images, label, sid in loader:   # collated: one dense tensor per view
        yield tuple(images), label.long(), sid.long()
