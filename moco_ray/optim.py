"""Optimizers (sgd | lars | adamw, chosen by the config's `optimizer`) and the momentum schedule.

All three are torch.optim.Optimizer subclasses: their state_dict() goes into the checkpoint and
loads back after a restart or a resize (the state is per parameter, the same on every worker).
"""
import math

import torch

OPTIMIZERS = ("sgd", "lars", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as MoCo v3 uses it.

    For every parameter w with gradient g of more than one dimension (weights of convolutions and
    linear layers):
        u = g + weight_decay * w
        u = u * trust_coefficient * ||w|| / ||u||     (unscaled when ||w|| or ||u|| is 0)
    BN weights, biases and other 1-D parameters are excluded from both: u = g.
    Then, for all:  v = momentum * v + u;  w = w - lr * v.
    State per parameter: the momentum buffer v (one tensor of w's size).
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is not None:
                    self._update(w, group)
        return loss

    def _update(self, w, group):
        u = w.grad
        if w.ndim > 1:
            u = u.add(w, alpha=group["weight_decay"])
            w_norm, u_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(u)
            ratio = group["trust_coefficient"] * w_norm / u_norm
            u = u * torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
        state = self.state[w]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(w)
        v = state["momentum_buffer"]
        v.mul_(group["momentum"]).add_(u)
        w.add_(v, alpha=-group["lr"])


def make_optimizer(name, params, lr, momentum, weight_decay):
    """sgd: torch's SGD with momentum; lars: LARS above; adamw: torch's AdamW (momentum unused: its
    betas stay torch's (0.9, 0.999), as moco-v3)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r}: choose one of {', '.join(OPTIMIZERS)}")


def moco_momentum(m, schedule, progress, epochs):
    """The key encoder's momentum at `progress` epochs (fractional): m throughout ("constant"), or
    ("cosine", moco-v3's --moco-m-cos) rising from m to 1 by a half cosine over the epochs:
        m(t) = 1 - (1 - m) * (cos(pi * t / epochs) + 1) / 2."""
    if schedule == "constant":
        return m
    return 1.0 - (1.0 - m) * (math.cos(math.pi * min(progress / epochs, 1.0)) + 1.0) / 2.0
