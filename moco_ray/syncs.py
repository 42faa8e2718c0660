"""Counts the points where the host waits for the device: each one stops the host from queueing
the next kernels until the GPU has run out of work.

    with HostSyncs() as syncs:
        ...                       # a step
    syncs.count, syncs.ops        # how many, and which
    syncs.uploads                 # copies from the CPU to a device (not waits; counted apart)

Counted, on any device: the ops whose output size or value depends on device data (nonzero;
indexing by a boolean mask, which calls nonzero inside the op; masked_select; unique;
_local_scalar_dense, which .item(), float(t), int(t) and bool(t) call) and copies from a non-CPU
device to the CPU. On the CPU a read of a tensor
by tolist() or numpy() dispatches nothing, so it is counted at the Python level instead: it stands
for the copy that the same code makes on a GPU. A CPU run thus counts what a GPU run would wait for,
plus reads of tensors that stay on the CPU in a GPU run too (free there): on the step path only the
shuffle's split sizes at W > 1, computed from its CPU permutation.
"""
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
DATA_DEPENDENT = {aten.nonzero, aten._local_scalar_dense, aten.masked_select, aten._unique2, aten.unique_dim,
                  aten.unique_consecutive}
COPIES = {aten._to_copy, aten.copy_}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
READS = {"tolist", "numpy"}


def _copy_devices(packet, args, kwargs):
    """(source, destination) device types of a copy op; None for a source that is not a tensor."""
    if packet is aten._to_copy:
        src, dst = args[0], kwargs.get("device") or args[0].device
    else:  # copy_(self=destination, src)
        dst, src = args[0].device, args[1]
    return (src.device.type, torch.device(dst).type) if torch.is_tensor(src) else None


def _is_mask(index):
    return torch.is_tensor(index) and index.dtype in (torch.bool, torch.uint8)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts, uploads):
        super().__init__()
        self.counts, self.uploads = counts, uploads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in DATA_DEPENDENT:
            self.counts[packet.__name__] += 1
        elif packet in INDEXING and any(_is_mask(i) for i in args[1]):
            self.counts["mask_index"] += 1
        elif packet in COPIES:
            devices = _copy_devices(packet, args, kwargs)
            if devices and devices[0] != "cpu" and devices[1] == "cpu":
                self.counts[packet.__name__] += 1
            elif devices and devices[0] == "cpu" and devices[1] != "cpu":
                self.uploads[packet.__name__] += 1
        return func(*args, **kwargs)


class _Reads(TorchFunctionMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS and args and torch.is_tensor(args[0]) and args[0].device.type == "cpu":
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """A context manager that counts host syncs (see the module docstring) in its body."""

    def __init__(self):
        self.ops, self.uploads = Counter(), Counter()
        self._modes = (_Reads(self.ops), _Dispatch(self.ops, self.uploads))

    @property
    def count(self):
        return sum(self.ops.values())

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False
