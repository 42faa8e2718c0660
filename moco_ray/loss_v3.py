"""MoCo v3's contrastive loss for W workers: each local query against the keys of the global batch.

For local query i of worker r (global index r*b + i) and the B = W*b keys of all workers:
    loss_i = 2T * (logsumexp_j(q_i . k_j / T) - q_i . k_{r*b+i} / T)
the cross-entropy of logits q @ k_all^T / T with label r*b + i, scaled by 2T, as moco-v3's
builder.py (its ctr() in Algorithm 1). The keys carry no gradient, so nothing is gathered in the
backward: DDP's average of the W local means is the gradient of the global mean.

Per worker and step (one direction; the symmetric loss calls it twice):
    communication  one all_gather of the keys: receives (W-1)*b*D floats (B*D*4 bytes in fp32)
    memory         the gathered keys B*D and the logits b*B, both fp32: at B=4096, D=256, W=64
                   4 MiB + 1 MiB; at W=1, 4 MiB + 64 MiB.
Nothing grows with K: there is no queue.
"""
import torch
import torch.nn.functional as F

from .collectives import all_gather, world


def global_batch_info_nce(q, k, T, group=None):
    """Loss (mean over the local queries, times 2T) and detached stats: l_pos, l_neg (mean cosines
    of positives and negatives) and acc (fraction of local queries whose own key scores highest).

    q: local normalised queries (b x D), same b on every worker; k: the normalised keys of the same
    b images (no grad). Call on every worker of `group` together."""
    rank, W = world(group)
    b = q.shape[0]
    keys = all_gather(k.detach().float(), group)                  # B x D, rank order
    logits = q.float() @ keys.t()                                  # b x B cosines
    labels = torch.arange(b, device=q.device) + rank * b
    loss = F.cross_entropy(logits / T, labels) * (2 * T)
    with torch.no_grad():
        l_pos = logits.gather(1, labels[:, None])[:, 0]
        n_neg = logits.numel() - b
        stats = dict(l_pos=l_pos.mean(),
                     l_neg=(logits.sum() - l_pos.sum()) / max(n_neg, 1),
                     acc=(logits.argmax(dim=1) == labels).float().mean())
    return loss, stats
