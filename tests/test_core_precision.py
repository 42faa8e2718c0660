"""Mixed precision on the CPU (autocast bf16/fp16, GradScaler) and the fused momentum update."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F

import moco_ray.step
from moco_ray import checkpoint, precision
from moco_ray.model import MomentumUpdate, build_encoder, momentum_update
from moco_ray.step import MoCo


def small_moco(p, K=64, **kw):
    torch.manual_seed(0)
    return MoCo(arch="resnet18", dim=16, K=K, m=0.9, T=0.2, mlp=True, small_stem=True, seed=7, precision=p,
                bn_splits=2, **kw)


def test_fused_momentum_update_is_bitwise_the_loop():
    torch.manual_seed(0)
    q = build_encoder("resnet18", 8, mlp=True, small_stem=True, head_bn=True)
    k_loop, k_fused = copy.deepcopy(q), copy.deepcopy(q)
    fused = MomentumUpdate(q, k_fused)
    k_buffers = [b.clone() for b in k_fused.buffers()]
    for m in (0.99, 0.9, 0.999, 0.0):
        with torch.no_grad():
            for p in q.parameters():
                p.add_(torch.randn_like(p))
            for b in q.buffers():
                b.add_(1)
        momentum_update(q, k_loop, m)
        fused(m)
        for a, b in zip(k_loop.parameters(), k_fused.parameters()):
            assert torch.equal(a, b)
    # buffers (BN running statistics) are the key encoder's own, not averaged: as the authors' code
    assert all(torch.equal(a, b) for a, b in zip(k_buffers, k_fused.buffers()))


def test_fused_update_follows_the_parameters_through_to_and_load_state_dict():
    model = small_moco("fp32")
    model.to(torch.device("cpu"), memory_format=torch.channels_last)
    model.encoder_q.load_state_dict(build_encoder("resnet18", 16, mlp=True, small_stem=True).state_dict())
    expected = [0.5 * k + 0.5 * q for q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters())]
    model.momentum_update(0.5)
    for e, k in zip(expected, model.encoder_k.parameters()):
        torch.testing.assert_close(k, e)


def _loss_and_grads(p, im_q, im_k, seen):
    model = small_moco(p)
    loss, _ = model(im_q, im_k, 0)
    loss.backward()
    seen["queue"] = model.queue.keys.dtype
    return loss.detach(), [(n, t.grad.flatten()) for n, t in model.encoder_q.named_parameters()]


def test_bf16_step_is_close_to_fp32_and_keeps_the_loss_in_fp32(monkeypatch):
    """Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9, about 0.2%). The loss is one
    log-sum-exp of fp32 cosines of features rounded once, so it agrees to 1%. The gradients are
    rounded at each of the ~20 layers on the way back, and BN's backward subtracts per-channel means
    of nearly equal numbers: at random init the first layers' gradients differ by up to ~45% in norm,
    while the head's agree to a few percent. So: the head's gradient direction to cos > 0.99, the
    whole gradient's to cos > 0.9 (a wrong dtype or a missed autocast region is far outside these)."""
    g = torch.Generator().manual_seed(1)
    im_q, im_k = torch.rand(16, 3, 16, 16, generator=g), torch.rand(16, 3, 16, 16, generator=g)
    dtypes = []
    real = moco_ray.step.sharded_info_nce

    def spy(q, k, queue_keys, T, group=None):
        dtypes.append((q.dtype, k.dtype, queue_keys.dtype))
        return real(q, k, queue_keys, T, group)

    monkeypatch.setattr(moco_ray.step, "sharded_info_nce", spy)
    seen32, seen16 = {}, {}
    loss32, grads32 = _loss_and_grads("fp32", im_q, im_k, seen32)
    loss16, grads16 = _loss_and_grads("bf16", im_q, im_k, seen16)
    assert dtypes == [(torch.float32,) * 3] * 2 and seen16["queue"] == torch.float32
    assert loss16.dtype == torch.float32
    assert abs(loss16 - loss32) / loss32 < 1e-2
    cos = lambda a, b: F.cosine_similarity(a, b, dim=0).item()
    assert cos(grads16[-1][1], grads32[-1][1]) > 0.99  # fc.2.weight
    assert cos(torch.cat([g for _, g in grads16]), torch.cat([g for _, g in grads32])) > 0.9


def test_bf16_autocast_really_runs_the_encoders_in_bf16():
    model = small_moco("bf16")
    out = {}
    model.encoder_q.layer1.register_forward_hook(lambda m, i, o: out.update(dtype=o.dtype))
    model(torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), 0)
    assert out["dtype"] == torch.bfloat16


def test_fp16_grad_scaler_skips_overflowing_steps_and_survives_a_checkpoint(tmp_path):
    model = small_moco("fp16", K=16)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
    x = torch.rand(4, 3, 8, 8)
    # A scale of 2^40 overflows fp16 in the backward pass: the scaler skips the step and halves it.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, growth_interval=3)
    before = [p.detach().clone() for p in model.encoder_q.parameters()]
    loss, _ = model(x, x, 0)
    assert precision.backward_and_step(loss, optimizer, scaler) is True
    assert scaler.get_scale() == 2.0 ** 39
    assert all(torch.equal(a, p) for a, p in zip(before, model.encoder_q.parameters()))
    scaler.update(1.0)  # a scale that fits: the next step is taken
    optimizer.zero_grad()
    loss, _ = model(x, x, 1)
    assert precision.backward_and_step(loss, optimizer, scaler) is False
    assert any(not torch.equal(a, p) for a, p in zip(before, model.encoder_q.parameters()))

    state = {"scaler": scaler.state_dict(), "progress": {}}
    checkpoint.save(tmp_path, 0, 1, state, model.queue.state_dict(), {"step": 2})
    loaded, _, _ = checkpoint.load(tmp_path, 0, 1, 16)
    restored = precision.grad_scaler("fp16", "cpu")
    restored.load_state_dict(loaded["scaler"])
    assert restored.state_dict() == scaler.state_dict() and restored.get_scale() == 1.0


def test_precision_defaults_per_device():
    assert precision.resolve("auto", "auto", cuda=True) == ("bf16", "true")
    assert precision.resolve("auto", "auto", cuda=False) == ("fp32", "false")
    assert precision.resolve("fp16", "false", cuda=True) == ("fp16", "false")
    assert precision.grad_scaler("fp16", "cpu").is_enabled()
    assert not precision.grad_scaler("bf16", "cpu").is_enabled()
    assert not precision.grad_scaler("fp32", "cpu").is_enabled()


def test_precision_config_errors():
    from moco_ray import config as C

    with pytest.raises(C.ConfigError, match="precision"):
        C.validate(C.load("demo", ["precision=fp8"]))
    with pytest.raises(C.ConfigError, match="fp16 needs a GPU"):
        C.for_device(C.load("demo", ["precision=fp16"]), cuda=False)
    cfg = C.for_device(C.load("moco-v2"), cuda=True)
    assert (cfg.precision, cfg.channels_last) == ("bf16", "true")


def test_gpu_benchmark_runs_without_ray_or_ffcv():
    """bench/gpu.py must run where only torch exists: its smoke mode, in a fresh interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    run = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ray imported: False, ffcv imported: False" in run.stdout
    assert "bf16 + channels_last" in run.stdout and "v2 augmentations only" in run.stdout
    assert "v3 resnet18 fp32" in run.stdout and "v3 vit_small fp32" in run.stdout, run.stdout
    assert re.search(r"host syncs per step +0\.0 ", run.stdout), run.stdout
    restored = r"restore on the device .*max \|param diff\| 0\.0e\+00; 3 steps after it: ok"
    assert re.search(restored, run.stdout), run.stdout
    assert "dense and pageable: True" in run.stdout and "copy to the device" in run.stdout, run.stdout


def test_cuda_backends_keep_tf32_for_convolutions_and_fp32_for_matmuls():
    """The decision, checked on the flags (setting them needs no GPU): the encoders' convolutions
    in TF32, every matmul (the InfoNCE's q @ queue, l_pos) in true fp32, as the docs promise."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        precision.configure_backends(torch.device("cuda"))
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        assert getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "ieee"
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = flags
