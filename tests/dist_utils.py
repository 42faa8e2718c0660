"""Run a function on W spawned processes joined by a real gloo process group."""
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_gloo(fn, world_size, *args):
    """fn(rank, world_size, *args) on every rank (fn must be a module-level function); returns the
    list of the ranks' return values. An exception in any rank fails the call with its traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, world_size, tmp, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def _entry(rank, fn, world_size, tmp, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, os.path.join(tmp, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()
