"""LARS against its definition, AdamW = torch's, the momentum schedule and the lr warmup against
their formulas, optimizer state across a checkpoint."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from moco_ray import config as C
from moco_ray.optim import LARS, make_optimizer, moco_momentum
from moco_ray.worker import learning_rate


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3, bias=False))


def set_grads(net, seed):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_lars_follows_its_definition():
    net, lr, wd, mom, eta = tiny_net(), 0.7, 0.01, 0.9, 0.001
    optimizer = LARS(net.parameters(), lr=lr, weight_decay=wd, momentum=mom, trust_coefficient=eta)
    with torch.no_grad():
        net[3].weight.zero_()          # ||w|| = 0: the update is not scaled
    w = [p.detach().clone() for p in net.parameters()]
    v = [torch.zeros_like(p) for p in w]
    for step in range(3):
        set_grads(net, step)
        expected = []
        for i, p in enumerate(net.parameters()):
            u = p.grad.clone()
            if p.ndim > 1:             # weights: decay and trust ratio; BN and biases: neither
                u = u + wd * w[i]
                if w[i].norm() > 0 and u.norm() > 0:
                    u = u * eta * w[i].norm() / u.norm()
            v[i] = mom * v[i] + u
            expected.append(w[i] - lr * v[i])
        optimizer.step()
        for i, p in enumerate(net.parameters()):
            assert_close(p.detach(), expected[i])
            w[i] = expected[i]
    # the exclusions: a BN weight moves by the plain momentum-SGD update
    assert [p.ndim > 1 for p in net.parameters()] == [True, False, False, False, True]


def test_lars_zero_gradient_and_no_gradient():
    net = tiny_net()
    optimizer = LARS(net.parameters(), lr=1.0, weight_decay=0.0)
    before = copy.deepcopy(net.state_dict())
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    net[0].bias.grad = None
    optimizer.step()
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)
    assert net[0].bias not in optimizer.state


def test_adamw_is_torchs():
    a, b = tiny_net(), tiny_net()
    mine = make_optimizer("adamw", a.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.1)
    torchs = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.1)
    assert type(mine) is torch.optim.AdamW
    for step in range(3):
        set_grads(a, step)
        set_grads(b, step)
        mine.step()
        torchs.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_state_dict_round_trip_resumes_exactly(name):
    a = tiny_net()
    opt = make_optimizer(name, a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    set_grads(a, 0)
    opt.step()
    saved_net, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt.state_dict())
    set_grads(a, 1)
    opt.step()

    b = tiny_net()
    b.load_state_dict(saved_net)
    resumed = make_optimizer(name, b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    resumed.load_state_dict(saved_opt)
    set_grads(b, 1)
    resumed.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer='rmsprop'"):
        make_optimizer("rmsprop", tiny_net().parameters(), 0.1, 0.9, 0.0)


def test_momentum_schedule():
    assert moco_momentum(0.99, "constant", 50, 100) == 0.99
    for t in (0, 10, 37.5, 50, 99, 100):
        assert moco_momentum(0.99, "cosine", t, 100) == pytest.approx(
            1 - (1 - 0.99) * (math.cos(math.pi * t / 100) + 1) / 2, abs=1e-15)
    assert moco_momentum(0.99, "cosine", 0, 100) == pytest.approx(0.99)
    assert moco_momentum(0.99, "cosine", 50, 100) == pytest.approx(0.995)
    assert moco_momentum(0.99, "cosine", 100, 100) == 1.0


def test_warmup_then_cosine():
    cfg = C.apply_overrides(C.Config(), {"lr": 0.6, "epochs": 100, "warmup_epochs": 10, "schedule": "cosine"})
    peak = 0.6 * 4096 / 256
    assert learning_rate(cfg, 4096, 0) == 0
    assert learning_rate(cfg, 4096, 2.5) == pytest.approx(peak * 0.25)
    assert learning_rate(cfg, 4096, 10) == pytest.approx(peak)
    assert learning_rate(cfg, 4096, 55) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert learning_rate(cfg, 4096, 100) == pytest.approx(0, abs=1e-12)


def test_warmup_then_step_and_no_warmup_unchanged():
    step = C.apply_overrides(C.preset("moco-v1"), {"warmup_epochs": 5})
    assert learning_rate(step, 256, 1) == pytest.approx(0.03 / 5)
    assert learning_rate(step, 256, 130) == pytest.approx(0.003)
    v2 = C.preset("moco-v2")
    for t in (0, 0.3, 17, 199.9):
        assert learning_rate(v2, 512, t) == 0.03 * 2 * 0.5 * (1.0 + math.cos(math.pi * min(t / 200, 1.0)))
    lincls = C.apply_overrides(C.LinclsConfig(), {"warmup_epochs": 2})
    assert learning_rate(lincls, 256, 1) == pytest.approx(15.0)
