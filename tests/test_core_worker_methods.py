"""PretrainLoop.build, set_lr and the checkpoint state for every method, without Ray: the same PretrainLoop
methods the Ray Train loop calls, on one process (no DDP: the step modules' equivalence under DDP
is tests/test_core_step_v3.py)."""
import copy

import pytest
import torch

from moco_ray import config as C
from moco_ray.optim import moco_momentum
from moco_ray.worker import PretrainLoop


def bare_worker(cfg):
    """A PretrainLoop with what build() and step() read, set as Loop.__init__ would on one CPU worker."""
    worker = PretrainLoop.__new__(PretrainLoop)
    worker.cfg, worker.device = C.for_device(cfg, cuda=False), torch.device("cpu")
    worker.b = worker.B = cfg.batch_size
    worker.progress = worker.progress_type()
    torch.manual_seed(cfg.seed)
    worker.build()
    worker.encoder_q = worker.model.encoder_q
    return worker


@pytest.mark.parametrize("method, optimizer", [("moco", "sgd"), ("v2plus", "adamw"), ("v3", "lars")])
def test_build_step_and_checkpoint_state(method, optimizer):
    cfg = C.apply_overrides(C.preset("demo-v3" if method == "v3" else "demo"),
                            {"method": method, "optimizer": optimizer, "m_schedule": "cosine",
                             "warmup_epochs": 2, "batch_size": 8, "K": 16, "aug": "v3" if method == "v3" else "v2"})
    worker = bare_worker(cfg)
    assert type(worker.optimizer).__name__ == {"sgd": "SGD", "lars": "LARS", "adamw": "AdamW"}[optimizer]
    assert (worker.queue_size is None) == (method == "v3") == (worker.queue_state() is None)
    g = torch.Generator().manual_seed(0)
    # as the loader hands them over: view q augmented, view k uint8 (augmented in the step)
    batch = (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8,
                                                                  generator=g), None, None)
    loss, stats, lr = worker.step(batch, 1.0)          # half way through the warmup
    assert lr == pytest.approx(cfg.lr * 8 / 256 / 2)
    assert worker.model.m == moco_momentum(cfg.m, "cosine", 1.0, cfg.epochs) > cfg.m
    assert torch.isfinite(loss) and 0 <= float(stats["acc"]) <= 1 and "m" in worker.step_fields()

    state = copy.deepcopy(worker.state_dict())
    restored = bare_worker(cfg)
    restored.load_state(state, copy.deepcopy(worker.queue_state()))
    for a, b in zip(worker.model.parameters(), restored.model.parameters()):
        assert torch.equal(a, b)
    assert restored.optimizer.state_dict()["state"].keys() == worker.optimizer.state_dict()["state"].keys()
    for w in (worker, restored):   # the same draws of view k's augmentation for both
        torch.manual_seed(1)
        w.step(batch, 1.5)
    for a, b in zip(worker.model.parameters(), restored.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)

