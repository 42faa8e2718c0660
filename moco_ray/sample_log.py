"""Audit of exactly-once: the sample ids that each step of a worker actually consumed.

The directory is a local path or a URI (moco_ray.storage). Each (segment, rank) writes its records
through a record_parts.PartWriter: on a local disk every step's record is appended at once; on an
object store the current part is PUT every 5 s (up to 200 records a part) and before every
checkpoint (`flush`, called by the loop), so every step a checkpoint covers is in the log even when
the worker is killed right after it. Cost there: one PUT of at most 200 records (a record is the
b sample ids of a step: ~8 bytes each) per 5 s and per checkpoint.
"""
import os
import time

import torch.distributed as dist

from moco_ray import storage
from moco_ray.record_parts import PartWriter, parse


class SampleLog:
    """One JSONL file per (worker-group segment, rank); a segment is named by rank 0's start time, so
    the steps a restarted group redoes can be told from the ones they replace."""

    def __init__(self, directory, rank):
        segment = [time.time_ns()]
        if dist.is_initialized():
            dist.broadcast_object_list(segment, src=0)
        self.segment = segment[0]
        self.writer = PartWriter(directory, f"samples-{self.segment}-{rank:04d}")
        self.rank = rank

    def write(self, epoch, step, sample_id):
        self.writer.write({"segment": self.segment, "rank": self.rank, "pid": os.getpid(), "epoch": epoch,
                           "step": step, "ids": sample_id.tolist()})

    def flush(self):
        """Everything written so far made durable (before a checkpoint)."""
        self.writer.flush()

    def close(self):
        self.writer.close()


def consumed_per_epoch(directory):
    """The ids each epoch really trained on: for every step, the records of the last segment that ran
    it (steps after the last checkpoint of a failed segment were run again by the next one)."""
    latest = {}
    directory = storage.at(directory)
    for name in directory.listdir():
        if not (name.startswith("samples-") and name.endswith(".jsonl")):
            continue
        for r in parse((directory / name).read_bytes()):   # skips the torn last line of a killed worker
            key = (r["epoch"], r["step"])
            if key not in latest or r["segment"] > latest[key][0]:
                latest[key] = (r["segment"], [])
            if r["segment"] == latest[key][0]:
                latest[key][1].append(r["ids"])
    epochs = {}
    for (epoch, _), (_, parts) in latest.items():
        epochs.setdefault(epoch, []).extend(i for ids in parts for i in ids)
    return epochs


def exactly_once_problems(directory, n, batch, epochs, seed=0):
    """What breaks "every sample of every epoch consumed exactly once" (empty when nothing does): per
    epoch, an id consumed twice, or one missing that is not in the final partial global batch."""
    from moco_ray.data import epoch_order

    consumed = consumed_per_epoch(directory)
    problems = []
    if sorted(consumed) != list(range(epochs)):
        problems.append(f"epochs {sorted(consumed)} instead of 0..{epochs - 1}")
    for epoch, ids in sorted(consumed.items()):
        if len(ids) != len(set(ids)):
            problems.append(f"epoch {epoch}: {len(ids) - len(set(ids))} samples consumed twice")
        missing = set(range(n)) - set(ids)
        dropped = set(epoch_order(seed, epoch, n)[n - n % batch:].tolist()) if n % batch else set()
        if missing != dropped:
            problems.append(f"epoch {epoch}: {len(missing - dropped)} samples never consumed")
    return problems
