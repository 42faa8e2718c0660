"""The MoCo v2 step at GPU speed: ResNet-50, 224 px, global batch 256 on one GPU, K=65536.

    python bench/gpu.py                     # on a CUDA machine (bench/gpu.sh runs this)
    python bench/gpu.py --smoke             # tiny sizes on the CPU: checks that it runs, nothing else

Needs only torch (with torchvision) and this repository's Ray-free core: moco_ray.step (MoCo:
encoders, sharded queue, InfoNCE, split-BN at W=1), moco_ray.precision and moco_ray.augment. No
Ray, no ffcv, nothing downloaded. Images are synthetic and already on the GPU, so this measures the
compute limit of a step: a query forward and backward plus a key forward per image pair (about 1.33x
a supervised ResNet-50 step), the momentum update, the InfoNCE against 65,536 keys and SGD.

Rows: fp32 (TF32 matmuls and convolutions), bf16 autocast, bf16 + channels_last; img/s (image pairs
per second) and peak GPU memory, with ratios against fp32. Then the batched v2 augmentations alone
(colour jitter, grayscale, blur of two 224 px views per image), as image pairs/s against the fastest
step: they run on the GPU beside the step and must be several times faster so they never bound it.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco_ray import precision  # noqa: E402
from moco_ray.augment import augment  # noqa: E402
from moco_ray.step import MoCo  # noqa: E402
from moco_ray.syncs import HostSyncs  # noqa: E402

MODES = (("fp32 (TF32)", "fp32", False), ("bf16", "bf16", False), ("bf16 + channels_last", "bf16", True))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def step_rate(args, device, mode, channels_last):
    """Image pairs per second and peak memory of the full MoCo step in one precision."""
    reset_peak(device)
    torch.manual_seed(0)
    model = MoCo(arch=args.arch, dim=128, K=args.K, m=0.999, T=0.2, mlp=True, bn="split", bn_splits=8,
                 precision=mode, channels_last=channels_last)
    model.to(device, memory_format=precision.memory_format(channels_last))
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    scaler = precision.grad_scaler(mode, device.type)
    g = torch.Generator(device=device).manual_seed(0)
    im_q = torch.randn(args.batch, 3, args.res, args.res, device=device, generator=g)
    im_k = torch.randn(args.batch, 3, args.res, args.res, device=device, generator=g)

    def run(steps, first):
        for step in range(first, first + steps):
            loss, _ = model(im_q, im_k, step)
            optimizer.zero_grad(set_to_none=True)
            precision.backward_and_step(loss, optimizer, scaler)
        sync(device)

    run(args.warmup, 0)  # cuDNN autotuning and allocator warm-up
    t0 = time.perf_counter()
    run(args.steps, args.warmup)
    seconds = time.perf_counter() - t0
    rate, peak = args.batch * args.steps / seconds, peak_bytes(device)
    del model, optimizer, im_q, im_k
    return rate, peak


def augment_rate(args, device):
    """Image pairs per second of the v2 augmentations of two views of a uint8 batch."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (args.batch, 3, args.res, args.res), dtype=torch.uint8, device=device,
                      generator=g)

    def run(n):
        for _ in range(n):
            augment(x, "v2", generator=g)
            augment(x, "v2", generator=g)
        sync(device)

    run(max(args.warmup // 2, 1))
    t0 = time.perf_counter()
    run(args.steps)
    return args.batch * args.steps / (time.perf_counter() - t0)


def syncs_per_step(args, device, steps=5):
    """Host syncs (moco_ray.syncs) per step of the step path without the loop's record: the v2
    augmentations of two uint8 views, the MoCo step in bf16 and SGD. The target is 0."""
    torch.manual_seed(0)
    model = MoCo(arch=args.arch, dim=128, K=args.K, m=0.999, T=0.2, mlp=True, bn="split", bn_splits=8,
                 precision="bf16").to(device)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    scaler = precision.grad_scaler("bf16", device.type)
    x = torch.randint(0, 256, (2, args.batch, 3, args.res, args.res), dtype=torch.uint8, device=device)
    with HostSyncs() as syncs:
        for step in range(steps):
            loss, _ = model(augment(x[0], "v2"), augment(x[1], "v2"), step)
            optimizer.zero_grad(set_to_none=True)
            precision.backward_and_step(loss, optimizer, scaler)
    sync(device)
    return syncs.count / steps, dict(syncs.ops)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--K", type=int, default=65536)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (a check that it runs)")
    args = p.parse_args()
    if args.smoke:
        args.batch, args.res, args.K, args.arch, args.steps, args.warmup = 16, 32, 64, "resnet18", 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    precision.configure_backends(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}: MoCo v2 {args.arch} {args.res}px, batch {args.batch} "
          f"(bn=split, 8 splits), K={args.K}, {args.steps} timed steps after {args.warmup}", flush=True)

    rows = []
    for label, mode, channels_last in MODES:
        if mode == "bf16" and device.type == "cpu" and not args.smoke:
            continue
        rate, peak = step_rate(args, device, mode, channels_last)
        rows.append((label, rate, peak))
        print(f"  {label}: {rate:.1f} img/s", flush=True)
    aug = augment_rate(args, device)

    base = rows[0][1]
    print(f"\n{'step':<24}{'img/s':>10}{'vs fp32':>10}{'peak GiB':>11}")
    for label, rate, peak in rows:
        print(f"{label:<24}{rate:>10.1f}{rate / base:>9.2f}x{peak / 2**30:>11.2f}")
    best = max(rate for _, rate, _ in rows)
    print(f"{'v2 augmentations only':<24}{aug:>10.1f}{aug / base:>9.2f}x{'':>11}   "
          f"{aug / best:.1f}x the fastest step (target >= 5x)")
    per_step, ops = syncs_per_step(args, device)
    print(f"{'host syncs per step':<24}{per_step:>10.1f}   (augment x2 + bf16 step + SGD; target 0) {ops or ''}")
    print(f"ray imported: {'ray' in sys.modules}, ffcv imported: {'ffcv' in sys.modules}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
