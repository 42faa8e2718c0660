"""The kNN monitor (Wu et al. 2018, as in the MoCo authors' demo): weighted k-nearest-neighbour
classification of L2-normalised backbone features against a bank of labelled training features.

The bank stays sharded: each rank keeps the features of its own slice of the bank (n/W rows), as
the key queue does. The queries go through in chunks of `chunk` rows: the rank holding a chunk
broadcasts it, every rank scores it against its shard and keeps its local top-k (similarity,
label), the W local lists are all_gathered, and the rank holding the chunk merges them into the
global top-k and votes: class c scores sum(exp(sim / t)) over the neighbours of class c,
accumulated with scatter_add_ into a chunk x classes tensor. Each query is voted on by the one
rank that holds it, so every query is counted once; the counts are all_reduced, so every rank
returns the same accuracy.

Memory per rank, in bytes, for n bank rows, q queries, features of dimension d (fp32), C classes
(`peak_bytes` computes it):
    bank shard          (n/W) * (4d + 8)                  features and labels
    own queries         (q/W) * (4d + 8)
    one chunk           4 * chunk * (n/W)                 similarities to the shard
                        12 * chunk * k * (W + 2)          local, gathered and merged top-k lists
                        4 * chunk * (C + d)               votes, the broadcast chunk
Nothing grows with n * q or with k * C (while `extract` concatenates its batches, it holds the
shard twice). Communication per chunk: a broadcast of chunk x d features and an all_gather of
W x chunk x k (similarity, label) pairs, so one evaluation receives q * (4d + 12 W k) bytes per
rank, whatever n is; gathering the whole bank onto every rank would receive n * (4d + 16) bytes
(bench/knn.py measures both).

Ties: neighbours tied in similarity at the k-th place are taken in torch.topk's order; a tie in
the vote goes to the lowest class index (argmax returns the first maximum).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moco_ray import collectives
from moco_ray.augment import denormalize

CHUNK = 256   # default queries per round (config knn_chunk)


@torch.no_grad()
def extract(backbone, loader, device):
    """Features (L2-normalised) and labels of this rank's slice of `loader`."""
    feats, labels = [], []
    for images, label, _ in loader:
        feats.append(F.normalize(backbone(images.to(device)), dim=1))
        labels.append(label.to(device))
    if not feats:
        dim = backbone(torch.zeros(2, 3, 32, 32, device=device)).shape[1]
        return torch.empty(0, dim, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


def _gather_columns(t, world):
    """Every rank's `t` side by side (dim 1), on every rank."""
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=1)


def _local_topk(query, bank, bank_labels, k, scores):
    """This shard's k most similar rows per query, as (similarity, label), padded to k columns with
    similarity -inf (vote weight 0) where the shard has fewer than k rows. scores: a buffer of at
    least len(query) rows of len(bank), reused by every chunk (on a CPU, fresh pages for every
    chunk cost more than the product)."""
    sim = torch.mm(query, bank.T, out=scores[:len(query)])
    top, idx = sim.topk(min(k, len(bank)), dim=1)
    labels = bank_labels[idx]
    if top.shape[1] < k:
        top = F.pad(top, (0, k - top.shape[1]), value=float("-inf"))
        labels = F.pad(labels, (0, k - labels.shape[1]), value=0)
    return top, labels


def _vote(sim, labels, num_classes, k, t):
    """Top-1 predictions from the candidates (sim, labels): the k best vote with weight exp(sim / t)."""
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(sim), num_classes, dtype=sim.dtype, device=sim.device)
    votes.scatter_add_(1, labels.gather(1, idx), (top / t).exp())
    return votes.argmax(dim=1)


@torch.no_grad()
def predict(query, bank, bank_labels, num_classes, k=200, t=0.1, chunk=CHUNK):
    """kNN predictions for this rank's `query` rows against the bank sharded over all ranks (this
    rank holds the rows `bank`, labels `bank_labels`). Every rank calls it, with its own queries
    (possibly none) and shard (possibly empty)."""
    rank, world = collectives.world()
    sizes = torch.tensor([[len(query), len(bank)]], device=bank.device)
    sizes = _gather_columns(sizes, world).view(world, 2)
    k = min(k, int(sizes[:, 1].sum()))
    if k < 1:
        raise ValueError("the kNN bank is empty")
    preds, scores = [], bank.new_empty(min(chunk, int(sizes[:, 0].max())), len(bank))
    for owner, count in enumerate(sizes[:, 0].tolist()):
        for start in range(0, count, chunk):
            rows = min(chunk, count - start)
            if owner == rank:
                q = query[start:start + rows].contiguous()
            else:
                q = query.new_empty(rows, query.shape[1])
            if world > 1:
                dist.broadcast(q, src=owner)
            sim, labels = (_gather_columns(x, world) for x in _local_topk(q, bank, bank_labels, k, scores))
            if owner == rank:
                preds.append(_vote(sim, labels, num_classes, k, t))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=query.device)


def top1(pred, labels):
    """Top-1 accuracy (%) over the queries of all ranks, the same on every rank (NaN if none)."""
    _, world = collectives.world()
    counts = torch.tensor([int((pred == labels).sum()), len(labels)], device=labels.device)
    if world > 1:
        dist.all_reduce(counts)
    correct, total = counts.tolist()
    return 100.0 * correct / total if total else float("nan")


@torch.no_grad()
def knn_top1(backbone, bank_loader, query_loader, num_classes, k, t, device, chunk=CHUNK):
    """kNN top-1 accuracy (%) of `backbone` features; every rank computes and returns the same number."""
    was_training = backbone.training
    backbone.eval()
    bank, bank_labels = extract(backbone, bank_loader, device)
    query, query_labels = extract(backbone, query_loader, device)
    backbone.train(was_training)
    pred = predict(query, bank, bank_labels, num_classes, k, t, chunk)
    return top1(pred, query_labels)


class RawPixels(torch.nn.Module):
    """The loaders' normalised images back in [0, 1], flattened (3 * res * res features). The cosine
    of raw pixels is the stronger baseline: after the mean/std normalisation a black background
    becomes a large constant that every image shares, and it swamps the similarities the ink makes
    (the glyphs: 37.9% kNN top-1 normalised, 67.7% raw)."""

    def forward(self, x):
        return denormalize(x).flatten(1)


def pixels_top1(bank_loader, query_loader, num_classes, k, t, device, chunk=CHUNK):
    """The baseline without an encoder: knn_top1 of the raw input pixels (RawPixels), at the
    resolution the encoders see."""
    return knn_top1(RawPixels(), bank_loader, query_loader, num_classes, k, t, device, chunk)


def peak_bytes(n, q, world, dim, num_classes, k=200, chunk=CHUNK):
    """The per-rank memory of the module docstring, in bytes (fp32 features, int64 labels)."""
    shard, own = -(-n // world), -(-q // world)
    chunk = min(chunk, max(own, 1))
    return ((shard + own) * (4 * dim + 8) + 4 * chunk * shard + 12 * chunk * k * (world + 2)
            + 4 * chunk * (num_classes + dim))
