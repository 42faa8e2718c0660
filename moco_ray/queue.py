"""The sharded global key queue: worker r of W holds a ring buffer of shard_size(K, W, r) keys.

The union of the W shards is the queue of the K most recent keys of all workers; it is never
replicated. Each slot remembers the step at which it was written (-1: the random initial key), so
that a checkpoint can be resharded to another worker count.
"""
import torch
import torch.nn.functional as F


def shard_size(K: int, W: int, r: int) -> int:
    return K // W + (1 if r < K % W else 0)


def seeded_generator(seed: int, n: int) -> torch.Generator:
    """A CPU generator seeded by the pair (seed, n), identical on every worker.

    The CPU generator (mt19937) keeps only 32 bits of its seed: mix the pair into 32 bits, so
    that for one seed every n < 2**32 gets its own stream and seeds differ at every n."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + n) % 2**32)


class KeyQueue:
    """Worker `rank`'s shard of the K-key queue. Not an nn.Module on purpose: no DDP buffer
    broadcast and no model state_dict may ever touch it."""

    def __init__(self, K: int, dim: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.K, self.rank, self.world_size = K, rank, world_size
        S = shard_size(K, world_size, rank)
        # random unit vectors as in the original code, different on every shard
        self.keys = F.normalize(torch.randn(S, dim, generator=seeded_generator(seed, rank)), dim=1)
        self.steps = torch.full((S,), -1, dtype=torch.int64)
        self.ptr = 0

    def __len__(self):
        return self.keys.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the keys (S_r*D*4 in fp32); the step bookkeeping adds 8*S_r."""
        return self.keys.numel() * self.keys.element_size()

    def to(self, device):
        self.keys, self.steps = self.keys.to(device), self.steps.to(device)
        return self

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor, step: int) -> None:
        """Write this worker's keys over the oldest slots, wrapping around the ring."""
        S = len(self)
        k = k.detach()[-S:]  # a batch larger than the shard keeps only its newest keys
        idx = (self.ptr + torch.arange(k.shape[0], device=self.keys.device)) % S
        self.keys[idx] = k.to(self.keys.dtype)
        self.steps[idx] = step
        self.ptr = (self.ptr + k.shape[0]) % S

    def state_dict(self) -> dict:
        return dict(keys=self.keys, steps=self.steps, ptr=self.ptr,
                    K=self.K, rank=self.rank, world_size=self.world_size)

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["keys"].shape) != tuple(self.keys.shape):
            raise ValueError(f"queue shard of shape {tuple(state['keys'].shape)} cannot load into "
                             f"{tuple(self.keys.shape)} (rank {self.rank} of {self.world_size}): reshard it")
        self.keys.copy_(state["keys"])
        self.steps.copy_(state["steps"])
        self.ptr = int(state["ptr"])


def reshard(shards: list, K: int, W_new: int) -> list:
    """Deal the W old shard states to W_new new ones.

    All keys are put in write order (by step, oldest first; ties by old shard, then by age in its
    ring), the K most recent are kept, and the i-th oldest goes to new shard i % W_new at slot
    i // W_new with ptr 0. So every new shard holds shard_size(K, W_new, r) keys and its next
    writes overwrite its oldest keys, which across shards are the globally oldest.
    """
    keys, steps = [], []
    for s in shards:
        S = s["keys"].shape[0]
        ring = (int(s["ptr"]) + torch.arange(S)) % S  # oldest slot first
        keys.append(s["keys"][ring.to(s["keys"].device)])
        steps.append(s["steps"][ring.to(s["steps"].device)])
    keys, steps = torch.cat(keys), torch.cat(steps)
    if keys.shape[0] < K:
        raise ValueError(f"the old shards hold {keys.shape[0]} keys, fewer than K={K}")
    order = torch.sort(steps, stable=True).indices[-K:]
    keys, steps = keys[order.to(keys.device)], steps[order]
    return [dict(keys=keys[r::W_new].clone(), steps=steps[r::W_new].clone(), ptr=0,
                 K=K, rank=r, world_size=W_new) for r in range(W_new)]
