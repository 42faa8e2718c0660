"""The sharded key queue: memory, ring writes, state, and resharding to another worker count."""
import pytest
import torch

from moco_ray.queue import KeyQueue, reshard, shard_size


@pytest.mark.parametrize("W", [1, 2, 4, 8])
def test_queue_memory_is_sharded(W):
    K, D = 4096, 128
    shards = [KeyQueue(K, D, r, W) for r in range(W)]
    for q in shards:
        assert q.nbytes == K * D * 4 // W  # not K * D * 4
        assert q.keys.dtype == torch.float32 and q.keys.shape == (K // W, D)
    assert sum(q.nbytes for q in shards) == K * D * 4


def test_shard_sizes_cover_K():
    for K in (7, 22, 65536):
        for W in (1, 2, 3, 5):
            sizes = [shard_size(K, W, r) for r in range(W)]
            assert sum(sizes) == K and max(sizes) - min(sizes) <= 1


def test_initial_keys_are_normalised_and_seeded_by_seed_and_rank():
    a, b, c = KeyQueue(10, 4, 0, 2, seed=1), KeyQueue(10, 4, 0, 2, seed=1), KeyQueue(10, 4, 1, 2, seed=1)
    assert torch.equal(a.keys, b.keys) and not torch.equal(a.keys, c.keys)
    assert not torch.equal(a.keys, KeyQueue(10, 4, 0, 2, seed=2).keys)
    torch.testing.assert_close(a.keys.norm(dim=1), torch.ones(5))
    assert (a.steps == -1).all() and a.ptr == 0


def test_enqueue_wraps_around_the_ring():
    q = KeyQueue(5, 2)
    for step in range(3):  # batch 2 does not divide 5
        q.enqueue(torch.full((2, 2), float(step)), step)
    assert q.steps.tolist() == [2, 0, 1, 1, 2] and q.ptr == 1
    assert q.keys[:, 0].tolist() == [2, 0, 1, 1, 2]
    q.enqueue(torch.arange(14, dtype=torch.float).view(7, 2), 3)  # larger than the shard: newest 5
    assert sorted(q.keys[:, 0].tolist()) == [4, 6, 8, 10, 12] and q.ptr == 1


def test_state_dict_round_trip_and_shape_check():
    q = KeyQueue(6, 3, 1, 2, seed=5)
    q.enqueue(torch.ones(2, 3), 7)
    p = KeyQueue(6, 3, 1, 2, seed=6)
    p.load_state_dict(q.state_dict())
    assert torch.equal(p.keys, q.keys) and torch.equal(p.steps, q.steps) and p.ptr == q.ptr
    with pytest.raises(ValueError, match="reshard"):
        KeyQueue(6, 3, 0, 3).load_state_dict(q.state_dict())


def fill(K, W, b, n_steps, D=4):
    """W queues after n_steps steps of b keys per worker; key = (step, rank, i, uid)."""
    queues = [KeyQueue(K, D, r, W, seed=3) for r in range(W)]
    for step in range(n_steps):
        for r, q in enumerate(queues):
            q.enqueue(torch.tensor([[step, r, i, 1000 * step + 10 * r + i] for i in range(b)],
                                   dtype=torch.float), step)
    return queues


def held(shards):
    """The multiset of (key, step) held by the shards."""
    return sorted((tuple(s["keys"][j].tolist()), int(s["steps"][j])) for s in shards for j in range(len(s["steps"])))


def write_order(shards):
    """All held keys oldest first: by step, ties by old shard then age in its ring (the spec)."""
    rows = []
    for s in shards:
        S = len(s["steps"])
        for a in range(S):
            j = (s["ptr"] + a) % S
            rows.append((int(s["steps"][j]), tuple(s["keys"][j].tolist())))
    return sorted(rows, key=lambda row: row[0])  # stable: keeps (shard, ring age) among equal steps


@pytest.mark.parametrize("W,W2", [(1, 2), (2, 3), (3, 1), (2, 2)])
@pytest.mark.parametrize("n_steps", [2, 17])  # queue partly random keys / wrapped several times
def test_reshard_keeps_the_K_most_recent_and_overwrites_the_oldest_first(W, W2, n_steps):
    K, b = 22, 3  # shards of 22 over 2 or 3 workers are uneven and b does not divide them
    old = [q.state_dict() for q in fill(K, W, b, n_steps)]
    new = reshard(old, K, W2)

    assert len(new) == W2
    assert [len(s["steps"]) for s in new] == [shard_size(K, W2, r) for r in range(W2)]
    assert held(new) == held(old)  # the old shards hold K keys: all of them are the K most recent
    order = write_order(old)
    for s in new:  # the ptr points at the shard's oldest key
        assert s["steps"][s["ptr"]] == s["steps"].min()

    queues = [KeyQueue(K, 4, r, W2) for r in range(W2)]
    for q, s in zip(queues, new):
        q.load_state_dict(s)
    b2 = 2
    # until the smallest shard wraps, each round of writes removes exactly the globally oldest keys
    for t in range(min(len(q) for q in queues) // b2):
        step = n_steps + t
        for r, q in enumerate(queues):
            q.enqueue(torch.tensor([[step, r, i, -1.0 - 1000 * step - 10 * r - i] for i in range(b2)]), step)
        kept = {row for row in held([q.state_dict() for q in queues]) if row[1] < n_steps}
        expected = {(key, step) for step, key in order[(t + 1) * W2 * b2:]}
        assert kept == expected


def test_reshard_keeps_the_most_recent_K_of_a_longer_history():
    K = 6
    shards = [dict(keys=torch.arange(5.0)[:, None] + 10 * r, steps=torch.tensor([4, 0, 1, 2, 3]) + 2 * r, ptr=1)
              for r in range(2)]  # 10 keys (K was larger then): keep the 6 newest
    new = reshard(shards, K, 2)
    steps = sorted(int(t) for s in new for t in s["steps"])
    assert steps == [3, 3, 4, 4, 5, 6]
    # oldest first, ties by old shard: shard 0's step-3 key before shard 1's
    assert new[0]["steps"].tolist() == [3, 4, 5] and new[1]["steps"].tolist() == [3, 4, 6]
    assert new[0]["keys"][0, 0] == 4 and new[1]["keys"][0, 0] == 12
