"""MoCo step: this implementation vs. a step in the style of the original moco/builder.py.

    python bench/step.py [--steps 20] [--batch 32] [--K 4096] [--arch resnet18]

Both run in the same two spawned processes (W=2 over gloo, one thread each), with the same model,
batch and K, DDP on the query encoder, forward + backward + SGD step, timed in alternating blocks.
(a) moco_ray.step.MoCo: sharded queue, sharded InfoNCE, all_to_all shuffle (bn=shuffle).
(b) reference: queue replicated on every worker, keys all_gathered before enqueue, shuffle by
    all_gather of the images and a permutation broadcast from rank 0.
"""
import argparse
import copy
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moco_ray.model import build_encoder, momentum_update  # noqa: E402
from moco_ray.queue import seeded_generator  # noqa: E402
from moco_ray.step import MoCo  # noqa: E402


@torch.no_grad()
def concat_all_gather(tensor):
    tensors_gather = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(tensors_gather, tensor)
    return torch.cat(tensors_gather, dim=0)


class ReferenceMoCo(nn.Module):
    """moco/builder.py (He et al.), with our encoder builder and DDP on the query encoder only."""

    def __init__(self, arch, dim, K, m, T, mlp, small_stem):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = build_encoder(arch, dim, mlp, small_stem)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.queue_ptr = 0

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        assert self.K % batch_size == 0
        self.queue[:, self.queue_ptr:self.queue_ptr + batch_size] = keys.T
        self.queue_ptr = (self.queue_ptr + batch_size) % self.K

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        x_gather = concat_all_gather(x)
        idx_shuffle = torch.randperm(x_gather.shape[0])
        dist.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(dist.get_world_size(), -1)[dist.get_rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        x_gather = concat_all_gather(x)
        idx_this = idx_unshuffle.view(dist.get_world_size(), -1)[dist.get_rank()]
        return x_gather[idx_this]

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            momentum_update(self.encoder_q, self.encoder_k, self.m)
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return F.cross_entropy(logits, labels)


def worker(rank, W, args, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=W)
    b, D = args.batch // W, args.dim
    kw = dict(arch=args.arch, dim=D, K=args.K, m=0.999, T=0.2, mlp=True, small_stem=True)
    torch.manual_seed(0)
    ours = MoCo(bn="shuffle", seed=0, **kw)
    torch.manual_seed(0)
    ref = ReferenceMoCo(**kw)
    ours.encoder_q, ref.encoder_q = DistributedDataParallel(ours.encoder_q), DistributedDataParallel(ref.encoder_q)
    opt = {m: torch.optim.SGD(m.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
           for m in (ours, ref)}
    g = torch.Generator().manual_seed(rank)
    im_q, im_k = (torch.randn(b, 3, args.res, args.res, generator=g) for _ in range(2))
    state = {"step": 0}

    def step_ours():
        loss, _ = ours(im_q, im_k, state["step"])
        state["step"] += 1
        return loss

    def run(model, fn, n):
        for _ in range(n):
            loss = fn()
            opt[model].zero_grad(set_to_none=True)
            loss.backward()
            opt[model].step()

    impls = [("a", ours, step_ours), ("b", ref, lambda: ref(im_q, im_k))]
    for _, model, fn in impls:
        run(model, fn, args.warmup)
    seconds = {"a": 0.0, "b": 0.0}
    block = max(1, args.steps // args.rounds)
    done = 0
    while done < args.steps:
        n = min(block, args.steps - done)
        for name, model, fn in impls if done // block % 2 == 0 else impls[::-1]:
            dist.barrier()
            t0 = time.perf_counter()
            run(model, fn, n)
            dist.barrier()
            seconds[name] += time.perf_counter() - t0
        done += n
    t = torch.tensor([seconds["a"], seconds["b"]], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)

    # logical bytes per worker per step, excluding what a worker keeps for itself
    img, feat = 3 * args.res * args.res * 4, D * 4
    kept = []
    for s in range(args.warmup + args.steps):  # the (seed, step) permutations (a) used
        perm = torch.randperm(W * b, generator=seeded_generator(0, s))
        dest = torch.argsort(perm)[rank * b:(rank + 1) * b] // b
        kept.append(int((dest == rank).sum()))
    moved = b - sum(kept) / len(kept)  # sent to (and received from) the other workers, mean
    ours_shuffle = (moved * img, moved * img, moved * feat, moved * feat)
    ref_shuffle = ((W - 1) * b * img, (W - 1) * b * img + (8 * W * b if rank else 0),
                   (W - 1) * b * feat, (W - 1) * b * feat)
    if rank == 0:
        sps = args.steps / t
        print(f"MoCo step, W={W} over gloo, {args.arch} small stem, {args.res}px, global batch "
              f"{b * W} ({b}/worker), K={args.K}, D={D}, {args.steps} timed steps each "
              f"(+{args.warmup} warm-up), 1 thread/worker")
        print(f"(a) moco_ray (sharded queue, all_to_all shuffle): {sps[0]:.3f} steps/s")
        print(f"(b) reference (replicated queue, all_gather shuffle): {sps[1]:.3f} steps/s")
        print(f"ratio (a)/(b): {sps[0] / sps[1]:.3f}")
        print(f"queue bytes per worker: (a) {ours.queue.nbytes:,}  (b) {ref.queue.numel() * 4:,}")
        for name, (si, ri, sf, rf) in (("(a)", ours_shuffle), ("(b)", ref_shuffle)):
            print(f"shuffle bytes per worker per step {name}: images sent {si:,.0f} received {ri:,.0f}; "
                  f"features back sent {sf:,.0f} received {rf:,.0f}; total {si + ri + sf + rf:,.0f}")
        print(f"other per-step traffic per worker (received): (a) q all_gather {(W - 1) * b * feat:,} "
              f"+ lse/stats all_gather {(W - 1) * 4 * W * b * 4:,} + their backward reduce-scatters "
              f"{(W - 1) * b * feat + (W - 1) * 4 * W * b * 4:,}; (b) key all_gather {(W - 1) * b * feat:,}")
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    p.add_argument("--batch", type=int, default=32, help="global batch (split over 2 workers)")
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="alternating timing blocks")
    args = p.parse_args()
    W = 2
    if args.batch % W or args.K % args.batch:
        p.error("--batch must be even and divide --K (the reference enqueues whole global batches)")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(W, args, os.path.join(tmp, "store")), nprocs=W, join=True)


if __name__ == "__main__":
    main()
