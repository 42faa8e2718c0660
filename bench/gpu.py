"""The MoCo v2 step at GPU speed: ResNet-50, 224 px, global batch 256 on one GPU, K=65536.

    python bench/gpu.py                     # on a CUDA machine (bench/gpu.sh runs this)
    python bench/gpu.py --smoke             # tiny sizes on the CPU: checks that it runs, nothing else

Needs only torch (with torchvision) and this repository's Ray-free core: moco_ray.step (MoCo:
encoders, sharded queue, InfoNCE, split-BN at W=1), moco_ray.precision and moco_ray.augment. No
Ray, no ffcv, nothing downloaded. Images are synthetic and already on the GPU, so this measures the
compute limit of a step: a query forward and backward plus a key forward per image pair (about 1.33x
a supervised ResNet-50 step), the momentum update, the InfoNCE against 65,536 keys and SGD.

Rows: fp32 (TF32 matmuls and convolutions), bf16 autocast, bf16 + channels_last; then MoCo v3's step
(symmetric loss, predictor, keys of the batch) for ResNet-50 with LARS (bf16 + channels_last) and
ViT-B/16 with AdamW (bf16); img/s (image pairs per second) and peak GPU memory, with ratios against
the v2 fp32 row. Then the batched v2 augmentations alone
(colour jitter, grayscale, blur of two 224 px views per image), as image pairs/s against the fastest
step: they run on the GPU beside the step and must be several times faster so they never bound it.
Then the checks of the CUDA path that the CPU suite can only test as decisions: host syncs per step
(target 0), a checkpoint restored onto the GPU through the loop's own restore and the steps after
it, and one batch's assembly (against a plain copy of its bytes) and its copy to the GPU from
pinned memory (against pageable).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import manifest as M  # noqa: E402
from moco_ray import checkpoint, data, precision, train_state  # noqa: E402
from moco_ray.augment import augment  # noqa: E402
from moco_ray.encoders import is_vit  # noqa: E402
from moco_ray.optim import make_optimizer  # noqa: E402
from moco_ray.step import MoCo  # noqa: E402
from moco_ray.step_v3 import MoCoV3  # noqa: E402
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


def v2_model(args, mode, channels_last):
    """The MoCo v2 step of the rows above and its SGD."""
    model = MoCo(arch=args.arch, dim=128, K=args.K, m=0.999, T=0.2, mlp=True, bn="split", bn_splits=8,
                 precision=mode, channels_last=channels_last)
    return model, make_optimizer("sgd", model.encoder_q.parameters(), 0.03, 0.9, 1e-4)


def v3_model(arch, optimizer):
    """A MoCo v3 step (its preset's MLP widths, bn=split at W=1) of `arch` and its optimizer."""
    def build(args, mode, channels_last):
        model = MoCoV3(arch=arch, dim=256, mlp_dim=4096, m=0.99, T=0.2 if is_vit(arch) else 1.0, res=args.res,
                       bn="split", bn_splits=8, stop_grad_conv1=is_vit(arch), precision=mode,
                       channels_last=channels_last)
        trained = [p for p in model.encoder_q.parameters() if p.requires_grad]
        return model, make_optimizer(optimizer, trained, 1e-4, 0.9, 0.1)
    return build


def step_rate(args, device, mode, channels_last, build=v2_model):
    """Image pairs per second and peak memory of the full step of build's model in one precision."""
    reset_peak(device)
    torch.manual_seed(0)
    model, optimizer = build(args, mode, channels_last)
    model.to(device, memory_format=precision.memory_format(channels_last))
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
    return args.batch * args.steps / seconds, peak_bytes(device)   # the model is freed on return


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


def restore_check(args, device, steps=3):
    """The first steps after a restart: two steps, a checkpoint (checkpoint.save, as the loop's
    save), a fresh model and optimizer built and moved to the device first, the restore through
    train_state.restore_moco (the loop's own restore, map_location to the device; it refuses
    optimizer state left off its parameters' device), then steps. A restore before the move left
    SGD's momentum buffers on the CPU and the first step raised. Returns (restore seconds,
    checkpoint MiB, max |parameter difference| after the restore, steps taken after it)."""
    def built():
        torch.manual_seed(0)
        model = MoCo(arch=args.arch, dim=128, K=args.K, m=0.999, T=0.2, mlp=True, bn="split", bn_splits=8,
                     precision="bf16" if device.type == "cuda" else "fp32").to(device)
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        return model, optimizer, precision.grad_scaler(model.precision, device.type)

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (2, args.batch, 3, args.res, args.res), dtype=torch.uint8, device=device, generator=g)

    def train(model, optimizer, scaler, first, n):
        for step in range(first, first + n):
            loss, _ = model(augment(x[0], "v2", g), augment(x[1], "v2", g), step)
            optimizer.zero_grad(set_to_none=True)
            precision.backward_and_step(loss, optimizer, scaler)
        sync(device)

    model, optimizer, scaler = built()
    train(model, optimizer, scaler, 0, 2)
    progress = {"step": 2, "epoch": 0, "samples_in_epoch": 2 * args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        state = dict(train_state.moco_state(model, optimizer, scaler), progress=progress)
        checkpoint.save(tmp, 0, 1, state, model.queue.state_dict(), progress)
        mib = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
        fresh, fresh_optimizer, fresh_scaler = built()
        t0 = time.perf_counter()
        train_state.restore_moco(tmp, fresh, fresh_optimizer, fresh_scaler, device)
        sync(device)
        seconds = time.perf_counter() - t0
    diff = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
               if a.is_floating_point())
    train(fresh, fresh_optimizer, fresh_scaler, 2, steps)
    return seconds, mib, diff, steps


def batch_transfer(args, device, shards=16, repeats=10):
    """Milliseconds (best of `repeats`, one thread as Ray gives a GPU worker) to assemble one batch
    of two uint8 views from `shards` shards' buffers (data.assemble, pinned for CUDA as the loader
    decides with data.pinned_for), one plain copy of the same bytes, and the copy of the assembled
    views to the device with non_blocking=True (asynchronous only from pinned memory) next to the
    same copy from pageable memory."""
    import numpy as np

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    size, pin = args.batch, data.pinned_for(device)
    shard = rng.integers(0, shards, size)
    pieces = []
    for s in np.unique(shard):
        where = np.flatnonzero(shard == s)
        images = torch.from_numpy(rng.integers(0, 256, (len(where), 2, 3, args.res, args.res), dtype=np.uint8))
        ids = torch.from_numpy(where).view(-1, 1).int()
        pieces.append((where, {M.IMAGE: images, M.ID: ids, M.LABEL: ids}))
    src = torch.randint(0, 256, (size, 2, 3, args.res, args.res), dtype=torch.uint8)

    def to_device(views):
        out = [v.to(device, non_blocking=True) for v in views]
        sync(device)
        return out

    views, _, _ = data.assemble(pieces, size, pin_memory=pin)
    pageable = [v.clone() for v in views]
    best = {}
    for _ in range(repeats):
        for name, fn in (("assemble", lambda: data.assemble(pieces, size, pin_memory=pin)),
                         ("plain copy", lambda: torch.empty_like(src).copy_(src)),
                         ("to device", lambda: to_device(views)),
                         ("to device (pageable)", lambda: to_device(pageable))):
            t = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    torch.set_num_threads(threads)
    dense = all(v.is_contiguous() and v.is_pinned() == pin for v in views)
    return {k: 1e3 * v for k, v in best.items()}, dense


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--K", type=int, default=65536)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--v3-resnet", default="resnet50", help="the ResNet of the MoCo v3 row (LARS)")
    p.add_argument("--v3-vit", default="vit_base", help="the ViT of the MoCo v3 row (AdamW, frozen patch projection)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (a check that it runs)")
    args = p.parse_args()
    if args.smoke:
        args.batch, args.res, args.K, args.arch, args.steps, args.warmup = 16, 32, 64, "resnet18", 1, 1
        args.v3_resnet, args.v3_vit = "resnet18", "vit_small"
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
    v3_rows, mode = [], "fp32" if device.type == "cpu" else "bf16"   # CPU: a check that it runs
    for arch, optimizer in ((args.v3_resnet, "lars"), (args.v3_vit, "adamw")):
        channels_last = not is_vit(arch) and device.type == "cuda"
        label = f"v3 {arch} {mode}{'+cl' if channels_last else ''}"
        rate, peak = step_rate(args, device, mode, channels_last, build=v3_model(arch, optimizer))
        v3_rows.append((label, rate, peak))
        print(f"  {label}: {rate:.1f} img/s", flush=True)
    aug = augment_rate(args, device)

    base = rows[0][1]
    print(f"\n{'step':<24}{'img/s':>10}{'vs fp32':>10}{'peak GiB':>11}")
    for label, rate, peak in rows + v3_rows:
        print(f"{label:<24}{rate:>10.1f}{rate / base:>9.2f}x{peak / 2**30:>11.2f}")
    best = max(rate for _, rate, _ in rows)
    print(f"{'v2 augmentations only':<24}{aug:>10.1f}{aug / base:>9.2f}x{'':>11}   "
          f"{aug / best:.1f}x the fastest step (target >= 5x)")
    per_step, ops = syncs_per_step(args, device)
    print(f"{'host syncs per step':<24}{per_step:>10.1f}   (augment x2 + bf16 step + SGD; target 0) {ops or ''}")
    seconds, mib, diff, steps = restore_check(args, device)
    print(f"{'restore on the device':<24}{seconds:>10.2f} s   ({mib:.0f} MiB checkpoint; max |param diff| "
          f"{diff:.1e}; {steps} steps after it: ok)")
    ms, dense = batch_transfer(args, device)
    print(f"{'batch assembly':<24}{ms['assemble']:>10.2f} ms  {ms['assemble'] / ms['plain copy']:.2f}x one plain "
          f"copy of the bytes (target <= 1.5x); dense and "
          f"{'pinned' if data.pinned_for(device) else 'pageable'}: {dense}")
    print(f"{'copy to the device':<24}{ms['to device']:>10.2f} ms  non_blocking from pinned; "
          f"{ms['to device (pageable)'] / ms['to device']:.2f}x that from pageable memory")
    print(f"ray imported: {'ray' in sys.modules}, ffcv imported: {'ffcv' in sys.modules}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
