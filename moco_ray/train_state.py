"""What a MoCo worker's checkpoint holds (both encoders, the optimizer, the loss scaler, its queue
shard) and how it is restored onto the device where training runs. Ray-free: the per-worker loop
(moco_ray.worker.PretrainLoop) and bench/gpu.py call these same functions.

The order is the contract: build the model, move it to its device (and wrap it in DDP), then
restore with map_location to that device. optimizer.load_state_dict casts the state to where each
parameter is at load time, and module.to(device) keeps the same Parameter objects (it replaces
their .data), so state loaded before the move stays behind and the first step mixes devices.
"""
import dataclasses
from dataclasses import dataclass

from moco_ray import checkpoint


@dataclass
class Progress:
    """Where a worker's run stands; every rank keeps its own copy, and rank 0's is checkpointed (the
    state's "progress", as a dict). A loop extends it with what it measures."""
    step: int = 0                # optimizer steps taken
    epoch: int = 0               # epochs completed
    samples_in_epoch: int = 0    # global samples of the current epoch consumed: where the loader starts
    starts: int = 0              # worker-group starts of this run (restarts = starts - 1)
    skipped_steps: int = 0       # fp16 steps skipped for inf/nan gradients

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved):
        """The progress a checkpoint holds; fields it lacks keep their initial values."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def unwrapped(module):
    """The module inside a DistributedDataParallel wrapper (its state_dict keys have no `module.`)."""
    return getattr(module, "module", module)


def moco_state(model, optimizer, scaler):
    """The part of a checkpoint's state that a MoCo worker's training needs (rank 0 writes it)."""
    return {"encoder_q": unwrapped(model.encoder_q).state_dict(), "encoder_k": model.encoder_k.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}


def load_moco_state(state, shard, model, optimizer, scaler):
    """Load moco_state() and this rank's queue shard into a model already on its device."""
    unwrapped(model.encoder_q).load_state_dict(state["encoder_q"])
    model.encoder_k.load_state_dict(state["encoder_k"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if model.queue is not None:   # MoCo v3 has no queue
        model.queue.load_state_dict(shard)


def restore_moco(path, model, optimizer, scaler, device, rank=0, world_size=1):
    """Restore a verified checkpoint into a model and optimizer already on `device`; returns the
    checkpoint's state dict (its progress). Raises CheckpointError when optimizer state is left
    elsewhere than its parameter (the model was moved after a restore).

    Cost for ResNet-50 at K=65536: each rank reads the state file (both encoders and the momentum
    buffers, ~320 MiB) straight onto its GPU, and its queue shard (K*D*4/W bytes, 0.5 MiB at W=64;
    all W old shards, 32 MiB, when W changed); at W=64 one start reads ~20 GiB from the checkpoint
    storage. The placement check walks the ~160 parameters once."""
    state, shard, _ = checkpoint.load(path, rank, world_size, model.K, device)
    load_moco_state(state, shard, model, optimizer, scaler)
    check_placement(optimizer)
    return state


def check_placement(optimizer):
    """CheckpointError naming the optimizer state that is not on its parameter's device and dtype."""
    wrong = checkpoint.misplaced_state(optimizer)
    if wrong:
        raise checkpoint.CheckpointError(f"optimizer state restored away from its parameters ({len(wrong)} "
                                         f"tensors, e.g. {wrong[0]}): move the model before the restore")
