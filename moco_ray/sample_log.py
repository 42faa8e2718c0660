"""Audit of exactly-once: the sample ids that each step of a worker actually consumed."""
import json
import os
import time
from pathlib import Path

import torch.distributed as dist


class SampleLog:
    """One JSONL file per (worker-group segment, rank); a segment is named by rank 0's start time, so
    the steps a restarted group redoes can be told from the ones they replace."""

    def __init__(self, directory, rank):
        Path(directory).mkdir(parents=True, exist_ok=True)
        segment = [time.time_ns()]
        if dist.is_initialized():
            dist.broadcast_object_list(segment, src=0)
        self.segment = segment[0]
        self.f = open(Path(directory) / f"samples-{self.segment}-{rank:04d}.jsonl", "a")
        self.rank = rank

    def write(self, epoch, step, sample_id):
        self.f.write(json.dumps({"segment": self.segment, "rank": self.rank, "pid": os.getpid(), "epoch": epoch,
                                 "step": step, "ids": sample_id.tolist()}) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()
