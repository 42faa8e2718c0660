"""The kNN monitor (Wu et al. 2018, as in the MoCo authors' demo): weighted k-nearest-neighbour
classification of L2-normalised backbone features, memory bank = the labelled train split."""
import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def extract(backbone, loader, device):
    """Features, labels and sample ids of this rank's slice of `loader`."""
    feats, labels, ids = [], [], []
    for images, label, sample_id in loader:
        feats.append(F.normalize(backbone(images.to(device)), dim=1))
        labels.append(label.to(device))
        ids.append(sample_id.to(device))
    if not feats:
        return None
    return torch.cat(feats), torch.cat(labels), torch.cat(ids)


def gather(feats, labels, ids, dim, device):
    """All ranks' features, ordered by sample id, on every rank (ranks may hold unequal slices)."""
    if feats is None:
        feats = torch.empty(0, dim, device=device)
        labels = torch.empty(0, dtype=torch.long, device=device)
        ids = torch.empty(0, dtype=torch.long, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        n = torch.tensor([len(ids)], device=device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        longest = int(max(s.item() for s in sizes))

        def pad_gather(t):
            padded = torch.zeros((longest,) + t.shape[1:], dtype=t.dtype, device=device)
            padded[: len(t)] = t
            out = [torch.zeros_like(padded) for _ in range(world)]
            dist.all_gather(out, padded)
            return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])

        feats, labels, ids = pad_gather(feats), pad_gather(labels), pad_gather(ids)
    order = ids.argsort()
    return feats[order], labels[order]


def knn_predict(query, bank, bank_labels, num_classes, k=200, t=0.1):
    """Top-1 predictions: the k most similar bank features vote with weight exp(sim / t)."""
    sim = query @ bank.T
    k = min(k, bank.shape[0])
    sim_k, idx_k = sim.topk(k, dim=1)
    weights = (sim_k / t).exp()
    one_hot = F.one_hot(bank_labels[idx_k], num_classes).to(weights.dtype)
    scores = (one_hot * weights.unsqueeze(-1)).sum(dim=1)
    return scores.argmax(dim=1)


@torch.no_grad()
def knn_top1(backbone, bank_loader, query_loader, num_classes, k, t, device):
    """kNN top-1 accuracy (%) of `backbone` features; every rank computes and returns the same number."""
    was_training = backbone.training
    backbone.eval()
    bank = extract(backbone, bank_loader, device)
    query = extract(backbone, query_loader, device)
    dim = (bank or query)[0].shape[1] if (bank or query) else _feature_dim(backbone, device)
    bank_f, bank_y = gather(*(bank or (None, None, None)), dim=dim, device=device)
    query_f, query_y = gather(*(query or (None, None, None)), dim=dim, device=device)
    backbone.train(was_training)
    pred = knn_predict(query_f, bank_f, bank_y, num_classes, k, t)
    return 100.0 * (pred == query_y).float().mean().item()


def _feature_dim(backbone, device):
    return backbone(torch.zeros(2, 3, 32, 32, device=device)).shape[1]
