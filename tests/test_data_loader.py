"""The two-view loader on real .beton files and on the ImageFolder fallback: views, exactly-once
coverage across world-size changes (from the sample ids the loader yields), eval slices.

Every image's pixels encode its id (conftest_data), so the tests check what was decoded, not only
the ids the loader reports. One converted dataset with two shards serves most tests; numba compiles
each ffcv pipeline (train, eval) once per process, whatever the dataset or shard."""
import numpy as np
import pytest
import torch

from conftest_data import id_of, make_tree, unnormalize
from data_prep import manifest as M
from data_prep.convert import convert
from moco_ray import data as D

N = 90          # 3 classes x 30
B = 4           # per-worker batch
RES = 16


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("coloured")
    make_tree(root / "tree", [30, 30, 30])
    convert(root / "tree", root / "ffcv", shards=2, workers=2, progress=False)
    return {"ffcv": root / "ffcv", "folder": root / "tree"}


def train_loader(path, *, epoch=0, start=0, rank=0, world_size=1, aug=None):
    return D.make_train_loader(path, seed=7, epoch=epoch, start=start, batch_per_worker=B, rank=rank,
                               world_size=world_size, res=RES, aug=aug, num_workers=1)


def run(path, world_size, start=0, steps=None, epoch=0):
    """Runs every rank of one world size from `start` for `steps` steps (all when None), as the
    train loop would; returns the sample ids in order of consumption and the next start."""
    per_rank = []
    for rank in range(world_size):
        loader = train_loader(path, epoch=epoch, start=start, rank=rank, world_size=world_size)
        got = []
        for i, (q, k, label, sid) in enumerate(loader):
            if steps is not None and i == steps:
                break
            assert q.shape == k.shape == (B, 3, RES, RES) and sid.dtype == label.dtype == torch.int64
            # the pixels are those of the sample the loader names
            assert [id_of(x) for x in unnormalize(q)] == sid.tolist()
            got.append(sid)
        assert steps is not None or len(got) == len(loader)
        per_rank.append(got)
    taken = len(per_rank[0])
    assert all(len(g) == taken for g in per_rank)
    ids = [int(s) for step in range(taken) for r in range(world_size) for s in per_rank[r][step]]
    return ids, start + taken * B * world_size


def test_dataset_info(datasets, tmp_path):
    for path in datasets.values():
        assert D.dataset_info(path) == {"n": N, "classes": ["c0", "c1", "c2"], "num_classes": 3}
    with pytest.raises(FileNotFoundError, match="no such dataset"):
        D.dataset_info(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a converted dataset"):
        D.dataset_info(tmp_path / "empty")


def test_order_is_pure_and_slices_are_exact():
    a, b = D.epoch_order(3, 1, 50), D.epoch_order(3, 1, 50)
    assert np.array_equal(a, b) and sorted(a) == list(range(50))
    assert not np.array_equal(a, D.epoch_order(3, 2, 50))
    rng = np.random.default_rng(0)
    for _ in range(200):   # random resize histories: exactly once, minus the final partial window
        n, b = int(rng.integers(1, 80)), int(rng.integers(1, 5))
        order, start, seen = D.epoch_order(0, 0, n), 0, []
        while True:
            W = int(rng.integers(1, 5))
            parts = [D.rank_indices(order, start, b, r, W).reshape(-1, b) for r in range(W)]
            steps = len(parts[0]) if rng.random() < 0.3 else min(len(parts[0]), int(rng.integers(0, 4)))
            seen += [x for s in range(steps) for p in parts for x in p[s]]
            start += steps * b * W
            if steps == len(parts[0]):
                break
        assert len(seen) == len(set(seen)) and seen == list(order[:len(seen)])
        assert n - len(seen) < b * W


def test_two_views_come_from_one_sample_and_differ(datasets):
    loader = train_loader(datasets["ffcv"], aug=None)
    differ = total = 0
    for q, k, label, sid in loader:
        uq, uk = unnormalize(q), unnormalize(k)
        assert [id_of(x) for x in uq] == [id_of(x) for x in uk] == sid.tolist()
        assert (label == sid // 30).all()
        differ += int(((uq - uk).abs().amax(dim=(1, 2, 3)) > 8).sum())
        total += len(sid)
    assert total == len(loader) * B == 88 and differ >= 0.9 * total

    q, k, label, sid = next(iter(train_loader(datasets["ffcv"], aug="v2")))
    assert q.dtype == torch.float32 and q.shape == (B, 3, RES, RES) and torch.isfinite(q).all()
    assert not torch.equal(q, k)


HISTORIES = [[1], [2], [3], [(2, 3), 3], [(3, 2), 1]]


# the fallback shares the order code with the ffcv path: two histories suffice there
@pytest.mark.parametrize("kind, sizes", [("ffcv", h) for h in HISTORIES] + [("folder", [2]), ("folder", [(2, 3), 3])],
                         ids=str)
def test_exactly_once_across_world_sizes(datasets, kind, sizes):
    """sizes: world sizes in the order of restarts; (W, s) runs s steps with W, then resizes."""
    path, ids, start = datasets[kind], [], 0
    for item in sizes:
        W, steps = item if isinstance(item, tuple) else (item, None)
        last_start = start
        got, start = run(path, W, start, steps)
        ids += got
    # each sample once, in epoch order; only the final partial window of the last world size is left
    assert len(ids) == len(set(ids)) == start
    assert ids == D.epoch_order(7, 0, N)[:start].tolist()
    assert N - start == (N - last_start) % (B * W)


def test_ffcv_and_imagefolder_give_the_same_samples(datasets):
    for rank in range(2):
        a = [sid for *_, sid in train_loader(datasets["ffcv"], epoch=3, start=8, rank=rank, world_size=2)]
        b = [sid for *_, sid in train_loader(datasets["folder"], epoch=3, start=8, rank=rank, world_size=2)]
        assert len(a) == len(b) == (N - 8) // (2 * B)
        assert torch.equal(torch.cat(a), torch.cat(b))


@pytest.mark.parametrize("kind", ["ffcv", "folder"])
def test_eval_slices_cover_everything_once(datasets, kind):
    seen, first = [], None
    for rank in range(3):
        loader = D.make_eval_loader(datasets[kind], batch_size=7, rank=rank, world_size=3, res=RES,
                                    num_workers=1)
        batches = list(loader)
        assert len(batches) == len(loader) == 5     # 30 per rank: 4 x 7 + 2
        for images, label, sid in batches:
            assert images.shape[1:] == (3, RES, RES) and images.dtype == torch.float32
            assert [id_of(x) for x in unnormalize(images)] == sid.tolist()
            assert (label == sid // 30).all()
            seen += sid.tolist()
        if rank == 0:
            first = batches[0][0]
    assert sorted(seen) == list(range(N))
    again = next(iter(D.make_eval_loader(datasets[kind], batch_size=7, rank=0, world_size=3, res=RES,
                                         num_workers=1)))[0]
    assert torch.equal(first, again)     # deterministic


def test_takes_across_ffcv_batches_keep_each_samples_pixels(datasets):
    """take_into() hands out ffcv's own buffers, which ffcv overwrites one next() later: the rest of
    a batch kept for the next take is used before the stream asks for another batch."""
    path = datasets["ffcv"]
    man = D._manifest(str(path), (path / M.MANIFEST).stat().st_mtime_ns)
    order = np.sort(man.index[man.shard == 0]).astype(np.uint64)
    stream = D._ShardStream(D._shard_loader(man, 0, order, "eval", RES, 5, 1))   # ffcv batches of 5
    ids = []
    for m in [3, 4, 9, 2, 12, 1, 8, 6]:    # 45: within a batch, across two and three, a batch's tail
        got = stream.take(m)
        sid = got[M.ID].view(-1).tolist()
        assert [id_of(x) for x in got[M.IMAGE]] == sid
        ids += sid
    stream.close()
    assert len(ids) == len(set(ids)) == len(order) == 45


def test_shards_with_different_image_sizes_share_one_pipeline(tmp_path):
    # shard 0 holds only small images, shard 2 only large ones: the shared ffcv pipeline must be
    # sized for the largest (a buffer sized from shard 0 would overflow on shard 2)
    make_tree(tmp_path / "tree", [8], sizes=((12, 10),))
    make_tree(tmp_path / "tree", [0, 8], sizes=((20, 18),), first=8)
    make_tree(tmp_path / "tree", [0, 0, 8], sizes=((48, 40),), first=16)
    convert(tmp_path / "tree", tmp_path / "ffcv", shards=3, workers=1, progress=False)
    ids = []
    for q, k, label, sid in train_loader(tmp_path / "ffcv"):
        assert [id_of(x) for x in unnormalize(q)] == [id_of(x) for x in unnormalize(k)] == sid.tolist()
        ids += sid.tolist()
    assert sorted(ids) == list(range(24))


def test_host_batches_are_dense_tensors_of_their_own(datasets):
    """What goes to .to(device, non_blocking=True): one dense tensor per view, assembled from both
    shards, not a strided view of a (B, 2, ...) buffer nor ffcv's buffer (it keeps its pixels
    after the next batch), in pinned memory exactly when the device is CUDA."""
    path = datasets["ffcv"]
    rows = D.rank_indices(D.epoch_order(7, 0, N), 0, 8, 0, 1)
    batches = D._batches(path, rows, [8] * 6, "train", RES, 1, torch.device("cpu"))
    kept = []
    for views, label, sid in batches:
        assert len(views) == 2 and all(v.is_contiguous() and not v.is_pinned() for v in views)
        assert views[0].data_ptr() != views[1].data_ptr() and views[0].shape == (8, 3, RES, RES)
        assert [id_of(x) for x in views[0]] == sid.tolist()
        kept.append((views, views[0].clone(), sid))
    assert len({int(D._manifest(str(path), (path / M.MANIFEST).stat().st_mtime_ns).shard[r]) for r in rows}) == 2
    for views, copy, sid in kept:
        assert torch.equal(views[0], copy)
    assert D.pinned_for("cuda") and D.pinned_for(torch.device("cuda", 3)) and not D.pinned_for("cpu")
    (images,), _, sid = next(iter(D._batches(path, np.sort(rows[:8]), [8], "eval", RES, 1, torch.device("cpu"))))
    assert images.is_contiguous(memory_format=torch.channels_last)   # dense, in ffcv's layout
    assert [id_of(x) for x in images] == sid.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_host_batches_for_cuda_are_pinned(datasets):
    rows = D.rank_indices(D.epoch_order(7, 0, N), 0, 8, 0, 1)
    views, _, _ = next(iter(D._batches(datasets["ffcv"], rows, [8], "train", RES, 1, torch.device("cuda"))))
    assert all(v.is_pinned() and v.is_contiguous() for v in views)


def test_assembly_puts_every_sample_at_its_position():
    """Pieces from three 'shards', some split over two ffcv batches, as the index_put it replaces."""
    rng = np.random.default_rng(0)
    size, shards = 29, rng.integers(0, 3, 29)
    images = torch.from_numpy(rng.integers(0, 256, (size, 2, 3, 5, 4), dtype=np.uint8))
    ids = torch.arange(size).view(-1, 1).int()
    pieces = []
    for s in range(3):
        where = np.flatnonzero(shards == s)
        for part in np.array_split(where, 2):   # two ffcv batches
            pieces.append((part, {M.IMAGE: images[part].clone(), M.ID: ids[part], M.LABEL: ids[part] % 3}))
    views, label, sid = D.assemble(pieces, size)
    assert torch.equal(views[0], images[:, 0]) and torch.equal(views[1], images[:, 1])
    assert torch.equal(sid, torch.arange(size)) and torch.equal(label, torch.arange(size) % 3)
    assert all(v.is_contiguous() for v in views)


def test_an_epoch_stats_each_shard_file_a_constant_number_of_times(datasets, monkeypatch):
    calls = []
    stat_key = D._stat_key
    monkeypatch.setattr(D, "_stat_key", lambda path: calls.append(path) or stat_key(path))
    for _ in train_loader(datasets["ffcv"]):
        pass
    assert len(calls) <= 2 * 2   # two shards: was shards x (shards + 1)


def test_one_view_loader_and_raw_key_views(datasets):
    for path in datasets.values():
        one = D.make_train_loader(path, seed=7, epoch=0, start=0, batch_per_worker=B, rank=0, world_size=1,
                                  res=RES, aug=None, num_workers=1, views=1)
        images, _, sid = next(iter(one))
        assert images.dtype == torch.float32 and images.shape == (B, 3, RES, RES)
        assert [id_of(x) for x in unnormalize(images)] == sid.tolist()
        raw = D.make_train_loader(path, seed=7, epoch=0, start=0, batch_per_worker=B, rank=0, world_size=1,
                                  res=RES, aug=None, num_workers=1, raw_k=True)
        q, k, _, sid = next(iter(raw))
        assert q.dtype == torch.float32 and k.dtype == torch.uint8 and k.shape == (B, 3, RES, RES)
        assert [id_of(x) for x in k] == sid.tolist()
