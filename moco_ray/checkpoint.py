"""Sharded checkpoints: rank 0 writes the model and training state, every rank writes its queue shard,
and rank 0 writes a manifest listing every file with its size and sha256. A checkpoint is valid only
when its manifest is there and every file it lists matches, so a partial or corrupt save is skipped
and the previous checkpoint is used.

Checkpoints are written to a local temporary directory and uploaded by Ray (`ray.train.report`) to
the run directory, a local path or any URI of moco_ray.storage. Reading goes through
moco_ray.storage: on an object store, `verify` (rank 0, when it chooses) GETs every file once to
hash it (a ResNet-50 at K=65536: 353 MiB per checkpoint tried), and `load` GETs the model state and
this rank's queue shard (all W old shards only on a resize), each held in memory while torch.load
parses it; listing the run directory is one LIST per 1000 names.
"""
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moco_ray import storage
from moco_ray.queue import reshard

log = logging.getLogger("moco_ray")

MANIFEST = "manifest.json"
STATE = "state.pt"
FORMAT = 1


class CheckpointError(RuntimeError):
    pass


def dir_name(step, start=0):
    """One name per (step, worker-group start): a group resumed from an older checkpoint saves the
    same steps again, and Ray must never see two checkpoints in one directory."""
    return f"checkpoint_{step:09d}-{start:03d}"


def queue_file(rank):
    return f"queue-{rank:04d}.pt"


HASH_CHUNK = 16 << 20   # bytes per read (one ranged GET on an object store): memory O(16 MiB), not O(file)


def _sha256(path):
    """sha256 of a file (a local path or a storage.Location), read in HASH_CHUNK pieces of known size."""
    h = hashlib.sha256()
    loc = storage.at(path)
    with loc.fs.open_input_file(loc.path) as f:
        size = f.size()
        for start in range(0, size, HASH_CHUNK):
            h.update(f.read(min(HASH_CHUNK, size - start)))
    return h.hexdigest()


def _describe(path):
    return {"bytes": os.path.getsize(path), "sha256": _sha256(path)}


def write_part(out_dir, rank, state, queue_state):
    """This rank's files: its queue shard (none when queue_state is None: a loop without a queue),
    and on rank 0 the model/optimizer/progress state."""
    out_dir = Path(out_dir)
    files = {}
    if queue_state is not None:
        torch.save(queue_state, out_dir / queue_file(rank))
        files[queue_file(rank)] = _describe(out_dir / queue_file(rank))
    if rank == 0:
        torch.save(state, out_dir / STATE)
        files[STATE] = _describe(out_dir / STATE)
    return files


def write_manifest(out_dir, parts, meta):
    """parts: every rank's write_part() listing. Written atomically, after the files it lists."""
    listing = {name: d for part in parts for name, d in part.items()}
    manifest = dict(meta, format=FORMAT, world_size=len(parts), queue=queue_file(0) in listing, files=listing)
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, Path(out_dir) / MANIFEST)


def save(out_dir, rank, world_size, state, queue_state, meta):
    """Write this rank's part of a checkpoint into out_dir (a local temp dir that Ray uploads into
    the shared checkpoint directory). Collective: every rank calls it. Returns the seconds taken."""
    t0 = time.perf_counter()
    files = write_part(out_dir, rank, state, queue_state)
    parts = [files]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, files)
    if rank == 0:
        write_manifest(out_dir, parts, meta)
    return time.perf_counter() - t0


def verify(path, deep=True):
    """Return the manifest of a complete checkpoint, or raise CheckpointError saying what is wrong."""
    path = storage.at(path, "checkpoint")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (partial save)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({e})") from None
    for name, d in manifest.get("files", {}).items():
        f = path / name
        info = f.info()
        if not info.is_file:
            raise CheckpointError(f"{path}: missing {name}")
        if info.size != d["bytes"] or (deep and _sha256(f) != d["sha256"]):
            raise CheckpointError(f"{path}: {name} does not match the manifest (corrupt)")
    files = manifest.get("files", {})
    if STATE not in files or (manifest.get("queue", True) and queue_file(0) not in files):
        raise CheckpointError(f"{path}: manifest lists no model state or queue")
    return manifest


def _order(path):
    """(step, start) of a checkpoint directory name; (-1, -1) for anything else."""
    m = re.fullmatch(r"checkpoint_(\d+)(?:-(\d+))?", storage.at(path).name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (-1, -1)


def in_run(run_dir):
    """Every checkpoint directory of a run (storage.Locations), newest (step, group start) first."""
    run_dir = storage.at(run_dir)
    found = [run_dir / name for name, info in run_dir.children()
             if info.type == storage.pafs.FileType.Directory and name.startswith("checkpoint_")]
    return sorted((p for p in found if _order(p) >= (0, 0)), key=_order, reverse=True)


def candidates(latest_path):
    """The reported checkpoint and its older siblings in the run directory, newest first."""
    latest = storage.at(latest_path)
    return [latest] + [p for p in in_run(latest.parent) if p != latest and _order(p) < _order(latest)]


def first_valid(paths):
    """The first valid checkpoint of `paths`, or None. Warns about each skipped one."""
    for path in paths:
        try:
            verify(path)
            return path
        except (CheckpointError, OSError) as e:  # OSError: deleted while it was read
            log.warning("skipping checkpoint: %s", e)
    return None


def find_valid(latest_path):
    """The newest valid checkpoint at or before latest_path, or None."""
    return first_valid(candidates(latest_path))


def newest_valid(run_dir):
    """The newest valid checkpoint in the run directory, or None: also one that Ray never heard of
    (its driver was killed between the upload and the report) or whose list Ray lost."""
    return first_valid(in_run(run_dir))


def next_group(run_dir):
    """A worker-group number above every one in the run's checkpoint names: the checkpoints of the
    group that starts now never share a directory with an older one, whatever it resumes from."""
    return 1 + max((_order(p)[1] for p in in_run(run_dir)), default=0)


def agreed(choose, rank, world_size):
    """choose() on rank 0 alone, and its answer on every rank (one broadcast_object_list). For what
    every rank must hold the same, such as the checkpoint to resume from: each rank choosing on its
    own can disagree after one failed read or stale listing on one node, and ranks that resume at
    different steps draw different shuffle permutations (an all_to_all of mismatched splits).
    Cost: one broadcast of a pickled path (~100 bytes) per use, once per start of a worker group."""
    chosen = [choose() if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def load(path, rank, world_size, K, device="cpu"):
    """Load a verified checkpoint for rank `rank` of `world_size`: the state dict, its tensors on
    `device` (where the model to load into already is: optimizer.load_state_dict puts the state on
    the parameters' device at load time, and a later module.to() does not move it), and this rank's
    queue shard on the CPU, resharded from however many workers wrote it (None with K=None: no
    queue; KeyQueue.load_state_dict copies it to the queue's device)."""
    path = storage.at(path, "checkpoint")
    manifest = verify(path, deep=False)
    state = _torch_load(path / STATE, device)
    if K is None:
        return state, None, manifest
    if manifest["world_size"] == world_size:   # this rank's own shard only
        return state, _torch_load(path / queue_file(rank), "cpu"), manifest
    old = [_torch_load(path / queue_file(r), "cpu") for r in range(manifest["world_size"])]
    shard = reshard(old, K, world_size)[rank]
    return state, shard, manifest


def _torch_load(location, device):
    with location.open_input() as f:
        return torch.load(f, map_location=device, weights_only=False)


def misplaced_state(optimizer):
    """Optimizer state tensors that do not sit with their parameter (another device or dtype), as
    'param i: key' strings; empty when every tensor of a parameter's shape does (a scalar such as
    Adam's `step` stays on the CPU by design)."""
    wrong = []
    for i, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        for key, value in optimizer.state.get(param, {}).items():
            if (torch.is_tensor(value) and value.shape == param.shape
                    and (value.device, value.dtype) != (param.device, param.dtype)):
                wrong.append(f"param {i}: {key} on {value.device}/{value.dtype}, "
                             f"the parameter on {param.device}/{param.dtype}")
    return wrong


class SaveSchedule:
    """When a loop saves between its start and its end: after every `every_steps` optimizer steps
    (step % every_steps == 0) and after `every_s` seconds of rank 0's clock since the last save or
    the start; 0 turns either rule off. An epoch end follows the same rule (`due(step, epoch_end=True)`).

    A save is a collective (every rank writes its part, gathers the listings, and Ray's report is a
    barrier), so every rank must decide the same. The step rule is a function of the step alone. The
    time rule reads rank 0's clock only at decision points, the steps divisible by `poll_steps` and
    every epoch end, and broadcasts rank 0's answer (one int) from there: no other rank's clock
    counts, and no step between decision points waits for anything. A save comes at most
    `poll_steps` steps late, so a restart replays at most every_s seconds plus poll_steps steps.

    Cost at W=64, B=4096 (~26 ms a step at 2,500 images/s per GPU, ~312 steps an epoch): per decision
    point one broadcast of 4 bytes (NCCL's tree over 64 ranks: tens of microseconds) and one host
    sync to read it, the GPU idle for about one kernel launch while the host queues the next step
    (well under 1 ms); every 50 steps (1.3 s) and per epoch end that is under 0.1 %. 50 is a multiple
    of the default report_every (10), whose record reads the loss on the same step.
    """

    def __init__(self, every_steps, every_s, rank, world_size, device="cpu", clock=time.monotonic,
                 poll_steps=50):
        self.every_steps, self.every_s, self.poll_steps = every_steps, every_s, poll_steps
        self.rank, self.world_size, self.device, self.clock = rank, world_size, device, clock
        self.last = clock()

    def due(self, step, epoch_end=False):
        """Whether to save after `step`. Every rank calls it after the same steps, with the same
        arguments (a decision point of the time rule is a collective)."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        if not self.every_s or not (epoch_end or step % self.poll_steps == 0):
            return False
        late = self.rank == 0 and self.clock() - self.last >= self.every_s
        if self.world_size == 1:
            return late
        flag = torch.tensor([int(late)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def saved(self):
        """A save just ended: the time rule counts from now."""
        self.last = self.clock()
