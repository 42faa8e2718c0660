"""Mixed precision, memory format and the CUDA backend switches: the one place that sets them.

precision "fp32" | "bf16" | "fp16": the encoders run under torch.autocast in the chosen dtype; the
caller normalises their outputs in fp32, and the InfoNCE (logits, log-sum-exp) and the queue stay in
fp32. fp16 needs loss scaling (torch.amp.GradScaler); bf16 has fp32's exponent range and does not.

On CUDA, fp32 convolutions use TF32 (10-bit mantissa inputs, fp32 accumulation) and fp32 matmuls do
not: the convolutions are nearly all of the encoders' work, while the InfoNCE's matmuls
(q @ queue shard: B*D*K/W multiply-adds, 2 GFLOP at B=256, K=65536, D=128, W=1) and the heads'
linear layers are a fraction of a percent of a ResNet-50 step, so they stay true fp32 at no
visible cost. With TF32 (inputs rounded to 11 significant bits) a logit q.k of unit vectors can be
off by up to ~1e-3, 5e-3 after dividing by T=0.2, against ~1e-7 in fp32.
"""
import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision, channels_last, cuda):
    """The config's "auto" values for a device: bf16 and channels_last on CUDA, fp32 on the CPU."""
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if channels_last == "auto":
        channels_last = "true" if cuda else "false"
    return precision, channels_last


def native_bf16_cpu():
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) that oneDNN uses; elsewhere CPU
    autocast to bf16 is emulated and slower than fp32."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def configure_backends(device):
    """cuDNN autotuning (fixed input shapes: it picks the fastest conv algorithms once), TF32 for
    fp32 convolutions and true fp32 for matmuls (the InfoNCE's logits), process-wide."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False


def autocast(precision, device_type):
    """The context the encoders run in: autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


def grad_scaler(precision, device_type):
    """A GradScaler that is active for fp16 only (a disabled one passes losses and steps through)."""
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def backward_and_step(loss, optimizer, scaler):
    """loss.backward() and optimizer.step() through the scaler; True when the step was skipped (fp16
    gradients with inf/nan: the scaler then lowers its scale and leaves the weights as they were)."""
    scaler.scale(loss).backward()
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    return scale is not None and scaler.get_scale() < scale
