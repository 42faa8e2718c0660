"""Restore and save decisions of the per-worker loop, outside Ray: the restore lands on the device the
model is on, every rank resumes from the checkpoint rank 0 chose, and saves follow rank 0's clock."""
from pathlib import Path

import pytest
import torch

from dist_utils import run_gloo
from moco_ray import checkpoint, config as C, train_state
from moco_ray.queue import KeyQueue
from moco_ray.step import MoCo
from moco_ray.worker import PretrainLoop

K = 64


def small_cfg():
    return C.for_device(C.load("demo", [f"K={K}", "dim=16"]), cuda=False)


def worker_without_ray(cfg, run_dir, rank=0, world_size=1, cls=PretrainLoop):
    """A PretrainLoop with what Ray's context gives it (rank, world size, device) set by hand: enough for
    build_and_restore, which needs nothing of Ray when the run directory is known."""
    loop = cls.__new__(cls)
    loop.cfg, loop.rank, loop.W, loop.device = cfg, rank, world_size, torch.device("cpu")
    loop.run_dir, loop.progress = str(run_dir), {}
    return loop


def save_checkpoint(run_dir, step, group, world_size=1, seed=0):
    """A checkpoint as the loop writes it, of a worker after one SGD step (so the optimizer holds a
    momentum buffer for every parameter)."""
    torch.manual_seed(seed)
    src = worker_without_ray(small_cfg(), run_dir)
    src.build()
    for p in src.model.encoder_q.parameters():
        p.grad = torch.randn_like(p)
    src.optimizer.step()
    state = {**src.state_dict(), "progress": {"step": step, "epoch": 0, "samples_in_epoch": step * 64}}
    path = Path(run_dir) / checkpoint.dir_name(step, group)
    path.mkdir(parents=True)
    parts = [checkpoint.write_part(path, r, state, KeyQueue(K, 16, r, world_size).state_dict())
             for r in range(world_size)]
    checkpoint.write_manifest(path, parts, {"step": step})
    return path, state


class MovedToFloat64(PretrainLoop):
    def to_device(self):
        # The stand-in for the move to a GPU: Module.to keeps the Parameter objects and changes their
        # dtype here as .to("cuda") changes their device.
        self.model.to(torch.float64)
        self.encoder_q = self.model.encoder_q


def test_restore_lands_on_the_device_the_model_was_moved_to(tmp_path):
    path, saved = save_checkpoint(tmp_path, step=7, group=1)
    loop = worker_without_ray(small_cfg(), tmp_path, cls=MovedToFloat64)
    assert loop.build_and_restore() == str(path) and loop.progress.step == 7
    params = list(loop.encoder_q.parameters())
    assert params and all(p.dtype == torch.float64 for p in params)
    for p, buffer in zip(params, saved["optimizer"]["state"].values()):
        restored = loop.optimizer.state[p]["momentum_buffer"]
        assert (restored.dtype, restored.device) == (p.dtype, p.device)
        torch.testing.assert_close(restored, buffer["momentum_buffer"].double())
    assert checkpoint.misplaced_state(loop.optimizer) == []


def test_restore_moco_refuses_a_model_moved_after_the_restore(tmp_path):
    path, _ = save_checkpoint(tmp_path, step=3, group=1)
    model = MoCo(arch="resnet18", dim=16, K=K, small_stem=True, mlp=True, head_bn=True, width=small_cfg().width)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert train_state.restore_moco(path, model, optimizer, scaler, "cpu")["progress"]["step"] == 3
    model.to(torch.float64)   # too late: the momentum buffers stay float32
    assert checkpoint.misplaced_state(optimizer)
    with pytest.raises(checkpoint.CheckpointError, match="move the model before the restore"):
        train_state.check_placement(optimizer)


def _resume_where_rank1_cannot_hash_the_newest(rank, world_size, run_dir, newest):
    if rank == 1:   # a stale listing or a transient read error on rank 1's node only
        hash_file = checkpoint._sha256

        def failing(path):
            if Path(path).parent == Path(newest):
                raise OSError(f"{path}: Stale file handle")
            return hash_file(path)

        checkpoint._sha256 = failing
    loop = worker_without_ray(small_cfg(), run_dir, rank, world_size)
    path = loop.build_and_restore()
    return path, loop.progress.step, [t.clone() for t in loop.encoder_q.state_dict().values()]


def test_every_rank_resumes_from_the_checkpoint_rank0_chose(tmp_path):
    save_checkpoint(tmp_path, step=10, group=1, world_size=2, seed=1)
    newest, _ = save_checkpoint(tmp_path, step=20, group=1, world_size=2, seed=2)
    (a, step_a, weights_a), (b, step_b, weights_b) = run_gloo(
        _resume_where_rank1_cannot_hash_the_newest, 2, str(tmp_path), str(newest))
    assert a == b == str(newest) and step_a == step_b == 20
    assert all(torch.equal(x, y) for x, y in zip(weights_a, weights_b))


# ------------------------------------------------------------------------------------------------
# When to save
# ------------------------------------------------------------------------------------------------

class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def decisions(schedule, clock, steps, seconds_per_step, epoch_length=None):
    """The steps after which `schedule` saves, over `steps` steps of `seconds_per_step` each."""
    saved = []
    for step in range(1, steps + 1):
        clock.now += seconds_per_step
        epoch_end = bool(epoch_length) and step % epoch_length == 0
        if schedule.due(step, epoch_end=epoch_end):
            saved.append(step)
            schedule.saved()
    return saved


def test_saves_by_steps_by_time_and_both():
    clock = FakeClock()
    by_steps = checkpoint.SaveSchedule(every_steps=4, every_s=0, rank=0, world_size=1, clock=clock)
    assert decisions(by_steps, clock, 13, 1.0) == [4, 8, 12]
    # 12 s at 1 s a step, rank 0's clock read every 5 steps: saves at the first read after 12 s
    clock = FakeClock()
    by_time = checkpoint.SaveSchedule(every_steps=0, every_s=12, rank=0, world_size=1, clock=clock, poll_steps=5)
    assert decisions(by_time, clock, 40, 1.0) == [15, 30]
    # an epoch end (every 7 steps) is a decision point too: saved as soon as one comes after 12 s
    clock = FakeClock()
    by_time = checkpoint.SaveSchedule(every_steps=0, every_s=12, rank=0, world_size=1, clock=clock, poll_steps=5)
    assert decisions(by_time, clock, 40, 1.0, epoch_length=7) == [14, 28, 40]
    clock = FakeClock()
    both = checkpoint.SaveSchedule(every_steps=8, every_s=12, rank=0, world_size=1, clock=clock, poll_steps=5)
    assert decisions(both, clock, 40, 1.0) == [8, 16, 24, 32, 40]
    assert decisions(both, clock, 20, 10.0) == [5, 8, 10, 15, 16, 20]


def test_a_restart_replays_at_most_the_interval():
    """Steps between two saves (what a failure just before the second replays): at most every_s
    seconds plus poll_steps steps, whatever the step time."""
    for seconds_per_step in (0.3, 1.0, 2.5, 7.0):
        clock = FakeClock()
        schedule = checkpoint.SaveSchedule(every_steps=0, every_s=30, rank=0, world_size=1, clock=clock,
                                           poll_steps=5)
        saved = decisions(schedule, clock, 400, seconds_per_step)
        gaps = [b - a for a, b in zip([0] + saved, saved)]
        assert len(saved) > 1 and max(gaps) <= 30 / seconds_per_step + 5, (seconds_per_step, gaps)


def _decide_with_own_clock(rank, world_size, seconds_per_step):
    clock = FakeClock()
    schedule = checkpoint.SaveSchedule(every_steps=0, every_s=12, rank=rank, world_size=world_size,
                                       clock=clock, poll_steps=5)
    return decisions(schedule, clock, 40, seconds_per_step[rank], epoch_length=7)


def test_every_rank_saves_when_rank0s_clock_says_so():
    # rank 1's clock runs 10x faster: its own reading would save at every decision point
    assert run_gloo(_decide_with_own_clock, 2, [1.0, 10.0]) == [[14, 28, 40]] * 2
