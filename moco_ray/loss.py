"""InfoNCE against a queue that is sharded over the workers, without gathering the queue.

For local query i of worker r, with l_pos_i = q_i . k_i and the negatives split over W shards:
    loss_i = logsumexp(l_pos_i / T, lse_1,i, ..., lse_W,i) - l_pos_i / T
where lse_s,i = logsumexp_j(q_i . shard_s,j / T) is computed on worker s. That is the
cross-entropy with label 0 of logits cat(l_pos, q @ queue) / T, as in the paper.
"""
import torch

from .collectives import all_gather, world


def sharded_info_nce(q, k, queue_keys, T, group=None):
    """Loss (mean over the local queries) and detached stats: l_pos, l_neg (mean cosines) and
    acc (fraction of local queries whose positive beats every negative of the global queue).

    q: local queries (b x D), same b on every worker; k: their keys (b x D, no grad);
    queue_keys: this worker's shard (S_r x D). Call on every worker of `group` together.
    """
    rank, W = world(group)
    b = q.shape[0]
    l_pos = torch.einsum("nc,nc->n", q, k.detach()).float()       # b
    # every worker scores all W*b queries against its shard: the backward of the two gathers
    # brings each worker the gradient of its queries from all shards
    Qg = all_gather(q, group)                                      # W*b x D
    # clone: backward needs the shard as it is now, and the step enqueues before backward
    l_neg = (Qg @ queue_keys.detach().clone().t()).float()         # W*b x S_r
    lse = torch.logsumexp(l_neg / T, dim=1)                        # W*b
    with torch.no_grad():
        neg_max, neg_sum = l_neg.max(dim=1).values, l_neg.sum(dim=1)
        n_neg = torch.full_like(neg_sum, l_neg.shape[1])
    # one gather for the lse (with autograd) and the stats (constants riding along)
    parts = all_gather(torch.stack([lse, neg_max, neg_sum, n_neg])[None], group)  # W x 4 x W*b
    parts = parts[:, :, rank * b:(rank + 1) * b]                   # W x 4 x b: my queries
    logits = torch.cat([l_pos[None] / T, parts[:, 0]])             # (1+W) x b
    loss = (torch.logsumexp(logits, dim=0) - l_pos / T).mean()
    with torch.no_grad():
        stats = dict(l_pos=l_pos.mean(),
                     l_neg=parts[:, 2].sum() / parts[:, 3].sum(),
                     acc=(l_pos > parts[:, 1].max(dim=0).values).float().mean())
    return loss, stats
