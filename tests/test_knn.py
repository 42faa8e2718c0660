"""The sharded kNN monitor: equal to a plain single-process kNN at W = 1, 2, 3 over gloo, bounded
memory on a bank of a million features, the per-class bank subset, and its config keys."""

import numpy as np
import pytest
import torch

from moco_ray import config as C
from moco_ray import data as D
from moco_ray import knn
from moco_ray.worker import peak_rss_bytes, reset_peak_rss, rss_bytes
from tests.dist_utils import run_gloo


def plain_knn(query, bank, bank_labels, num_classes, k, t):
    """Weighted kNN written out per query in float64 numpy: the k most similar bank rows vote
    exp(sim / t) for their class; the highest total wins (ties: the lowest class, as argmax)."""
    preds = []
    for q in query:
        sim = bank @ q
        nearest = np.argsort(-sim, kind="stable")[:k]
        votes = np.bincount(bank_labels[nearest], weights=np.exp(sim[nearest] / t), minlength=num_classes)
        preds.append(int(votes.argmax()))
    return np.array(preds)


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def problem(n, q, d=16, num_classes=7, seed=0):
    """Bank and queries around class centres, so that the labels matter (float64)."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng, num_classes, d)
    bank_y, query_y = rng.integers(0, num_classes, n), rng.integers(0, num_classes, q)
    bank = unit_rows(rng, n, d) + 0.6 * centres[bank_y]
    query = unit_rows(rng, q, d) + 0.6 * centres[query_y]
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return norm(bank), bank_y, norm(query), query_y


def _sharded(rank, world, n, q, k, chunk):
    bank, bank_y, query, query_y = problem(n, q)
    b_rows = np.array_split(np.arange(n), world)[rank]
    q_rows = np.array_split(np.arange(q), world)[rank]
    pred = knn.predict(torch.from_numpy(query[q_rows]), torch.from_numpy(bank[b_rows]),
                       torch.from_numpy(bank_y[b_rows]), 7, k=k, t=0.1, chunk=chunk)
    return q_rows, pred.numpy(), knn.top1(pred, torch.from_numpy(query_y[q_rows]))


@pytest.mark.parametrize("world, n, q, k", [(1, 600, 101, 20), (2, 600, 101, 20), (3, 600, 101, 20),
                                            (3, 2, 2, 5)])   # W=3, n=2: an empty shard, a rank without queries, k > n
def test_sharded_knn_equals_plain_knn(world, n, q, k):
    """Prediction for prediction. Ties: the features are continuous random float64, so a tie in
    similarity at the k-th place or between two classes' votes has probability zero; were there
    one, the plain kNN takes the lower bank row (stable sort) and the lower class (argmax), the
    sharded one torch.topk's order and the lower class."""
    bank, bank_y, query, query_y = problem(n, q)
    expected = plain_knn(query, bank, bank_y, 7, min(k, n), 0.1)
    out = run_gloo(_sharded, world, n, q, k, 16)
    rows = np.concatenate([r for r, _, _ in out])
    pred = np.concatenate([p for _, p, _ in out])
    assert np.array_equal(rows, np.arange(q))             # every query voted on once, by its own rank
    assert np.array_equal(pred, expected)
    accuracy = 100.0 * (expected == query_y).mean()
    assert [a for _, _, a in out] == pytest.approx([accuracy] * world)   # the same on every rank
    if n > k:
        assert 30 < accuracy < 100    # the labels matter, and the problem is not trivial


def test_without_a_process_group_is_one_rank():
    bank, bank_y, query, query_y = problem(300, 40)
    pred = knn.predict(*(torch.from_numpy(x) for x in (query, bank, bank_y)), 7, k=15, t=0.1, chunk=7)
    assert np.array_equal(pred.numpy(), plain_knn(query, bank, bank_y, 7, 15, 0.1))
    with pytest.raises(ValueError, match="empty"):
        knn.predict(torch.from_numpy(query), torch.empty(0, 16, dtype=torch.float64),
                    torch.empty(0, dtype=torch.long), 7)


# A million bank features: the dense kNN this replaced would need 5,000 x 1,000,000 x 4 B = 20 GB for the
# similarities alone (and 5,000 x 200 x 1,000 x 12 B = 12 GB for the one-hot vote).
BIG = dict(n=1_000_000, q=5_000, dim=128, num_classes=1000, k=200, chunk=C.Config().knn_chunk)


def _big(rank, world, n, q, dim, num_classes, k, chunk):
    """This rank's shard and queries, made here (seeded), then one evaluation; returns the peak
    memory this process added since before the shard existed (after a tiny evaluation has loaded
    the code it runs)."""
    tiny = torch.eye(4, dim)
    knn.predict(tiny, tiny, torch.arange(4), num_classes, k=k, t=0.1, chunk=chunk)
    reset_peak_rss()
    before = rss_bytes()
    g = torch.Generator().manual_seed(rank)
    rows, own = len(np.array_split(np.arange(n), world)[rank]), len(np.array_split(np.arange(q), world)[rank])
    bank = torch.randn(rows, dim, generator=g)
    bank /= bank.norm(dim=1, keepdim=True)
    bank_y = torch.randint(0, num_classes, (rows,), generator=g)
    query = bank[:own] + 0.1 * torch.randn(own, dim, generator=g)   # near-duplicates of bank rows
    query /= query.norm(dim=1, keepdim=True)
    pred = knn.predict(query, bank, bank_y, num_classes, k=k, t=0.1, chunk=chunk)
    accuracy = knn.top1(pred, bank_y[:own])
    return peak_rss_bytes() - before, accuracy, len(pred)


def test_a_million_feature_bank_stays_within_the_formula():
    world = 2
    out = run_gloo(_big, world, *BIG.values())
    bound = knn.peak_bytes(BIG["n"], BIG["q"], world, BIG["dim"], BIG["num_classes"], BIG["k"], BIG["chunk"])
    slack = 64 << 20    # per-thread top-k buffers, gloo's buffers, allocator rounding
    for added, _, _ in out:
        assert 0 < added < bound + slack, f"rank added {added / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
    assert sum(n for _, _, n in out) == BIG["q"]
    accuracies = [a for _, a, _ in out]
    assert accuracies[0] == accuracies[1]
    # each query's nearest neighbour (similarity ~0.99, weight e^9.9) is the bank row it was made
    # from; 199 random rows (similarity < 0.5) spread over 1000 labels cannot outvote it
    assert accuracies[0] > 90


# ------------------------------------------------------------------------------------------------
# The bank subset
# ------------------------------------------------------------------------------------------------

def test_class_subset_is_seeded_and_capped_per_class():
    labels = np.random.default_rng(3).integers(0, 10, 5000)
    labels[labels == 9] = 8     # class 9 empty
    labels[:3] = 9              # class 9: 3 samples, fewer than asked for
    rows = D.class_subset(labels, 40, seed=1)
    counts = np.bincount(labels[rows], minlength=10)
    assert list(counts) == [40] * 9 + [3]
    assert np.array_equal(rows, np.unique(rows))                  # ascending, no repeats
    assert np.array_equal(rows, D.class_subset(labels, 40, seed=1))
    assert not np.array_equal(rows, D.class_subset(labels, 40, seed=2))
    assert len(D.class_subset(labels, 10_000)) == len(labels)


def test_bank_loader_reads_the_same_subset_at_every_world_size(digits):
    train = digits["train"]
    labels = D.dataset_labels(train)
    expected = D.class_subset(labels, 5, seed=0)
    for world in (1, 2, 3):
        ids, got = [], []
        for rank in range(world):
            loader = D.make_eval_loader(train, batch_size=16, rank=rank, world_size=world, res=16,
                                        num_workers=1, per_class=5)
            for _, label, sid in loader:
                ids.append(sid.numpy())
                got.append(label.numpy())
        ids, got = np.concatenate(ids), np.concatenate(got)
        assert np.array_equal(ids, expected), world   # row = sample id in a converted dataset
        assert np.array_equal(got, labels[expected])
    assert len(expected) == 5 * D.dataset_info(train)["num_classes"]


def test_the_pixel_baseline_is_the_cosine_of_raw_pixels(digits, glyphs):
    """knn.pixels_top1, the baseline every pretrained accuracy is printed next to, at the demo's res
    and k, reads the pixels in [0, 1], not as normalised for the encoders: on white glyphs on black,
    the normalised background (the same large value in every image) swamps the ink and the baseline
    looks far weaker than raw pixels are."""
    top1, normalised = {}, {}
    for name, paths in (("digits", digits), ("glyphs", glyphs)):
        bank = D.make_eval_loader(paths["train"], batch_size=256, rank=0, world_size=1, res=16, num_workers=1)
        query = D.make_eval_loader(paths["val"], batch_size=256, rank=0, world_size=1, res=16, num_workers=1)
        top1[name] = knn.pixels_top1(bank, query, 10, k=200, t=0.1, device="cpu")
        normalised[name] = knn.knn_top1(torch.nn.Flatten(), bank, query, 10, k=200, t=0.1, device="cpu")
    assert top1["digits"] > 85 and top1["glyphs"] > normalised["glyphs"] + 15, (top1, normalised)


def test_knn_top1_on_digits_pixels(digits):
    """The whole monitor on real loaders, with raw pixels as the features: digits are easy."""
    backbone = torch.nn.Flatten()
    bank = D.make_eval_loader(digits["train"], batch_size=64, rank=0, world_size=1, res=16,
                              num_workers=1, per_class=50)
    query = D.make_eval_loader(digits["val"], batch_size=64, rank=0, world_size=1, res=16, num_workers=1)
    top1 = knn.knn_top1(backbone, bank, query, 10, k=20, t=0.1, device="cpu", chunk=32)
    bank_f, bank_y = knn.extract(backbone, bank, "cpu")
    query_f, query_y = knn.extract(backbone, query, "cpu")
    expected = plain_knn(query_f.double().numpy(), bank_f.double().numpy(), bank_y.numpy(), 10, 20, 0.1)
    assert top1 == pytest.approx(100.0 * (expected == query_y.numpy()).mean(), abs=0.6)
    assert top1 > 80


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

def test_presets_bound_the_bank_and_validation_refuses_bad_values():
    for name in ("moco-v1", "moco-v2"):
        cfg = C.preset(name)
        assert (cfg.knn_bank_per_class, cfg.knn_every) == (100, 10)
    assert C.preset("demo").knn_bank_per_class == 0        # the whole embedded train split
    for key, value in (("knn_chunk", 0), ("knn_bank_per_class", -1)):
        with pytest.raises(C.ConfigError, match=key):
            C.validate(C.apply_overrides(C.Config(), {key: value}))
