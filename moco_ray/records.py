"""A worker's newest step record, read from the device only when someone needs it.

Reading a value that the GPU computes (loss.item(), float(acc)) makes the host wait until the GPU
has run every kernel queued before it, and the host queues nothing meanwhile. So a step leaves its
device values (loss, accuracy, and the fields a callable returns: the queue age) as tensors, and
they are read when a record is due (every report_every steps), or when a checkpoint or the epoch's
end reads the record: one copy back for all of them, at most once per record.
"""
import torch


def due(step, every):
    """Whether step's record is read and sent: every `every` steps; never when every is 0."""
    return bool(every) and step % every == 0


def read(values):
    """values with each tensor replaced by its Python number (int for integer tensors), all the
    tensors of one device read in one copy."""
    out = dict(values)
    by_device = {}
    for key, v in values.items():
        if torch.is_tensor(v):
            by_device.setdefault(v.device, []).append(key)
    for keys in by_device.values():
        numbers = torch.stack([values[k].detach().reshape(()).to(torch.float64) for k in keys]).tolist()
        for k, number in zip(keys, numbers):
            out[k] = number if values[k].is_floating_point() else int(number)
    return out


class LazyRecord:
    """A record dict whose device values are read on the first get(). fields, when given, is called
    then, and what it returns (tensors or numbers) is read with them: the caller must get() before
    the state it describes changes (the loop reads a step's record before the next step)."""

    def __init__(self, record=None, device=None, fields=None):
        self._record = dict(record or {})
        self._pending = (dict(device or {}), fields) if device or fields else None

    def get(self):
        if self._pending is not None:
            device, fields = self._pending
            self._pending = None
            self._record.update(read({**device, **(fields() if fields else {})}))
        return self._record
