"""The per-worker loop: what Ray Train runs on every worker, and runs again from the newest valid
checkpoint after a restart or a resize.

    train_func            set up (or restore), then epochs of MoCo steps, kNN, checkpoints
    Loop                  what every training loop here shares (pretraining, moco_ray.lincls):
      .build_and_restore    the model built and moved to its device, then the newest valid
                            checkpoint (rank 0 chooses) loaded onto it: the subclass's state, progress
      .train_epoch          the steps of one epoch from the recorded sample position
      .record               a step's metrics to Prometheus and the run log
      .end_epoch, .end      epoch bookkeeping, the subclass's measurement, checkpoints
      .save                 a sharded checkpoint through ray.train.report, when .saves (a
                            checkpoint.SaveSchedule: steps and/or rank 0's clock) says so
    PretrainLoop(Loop)    MoCo pretraining:
      .step                 one optimizer step: the paper's Algorithm 1 (moco_ray.step.MoCo) + SGD
      .monitor              the kNN monitor on the backbone of the query encoder

Per-step metrics never go through ray.train.report (each call is a barrier that waits for the Train
controller's poll, ~1.6 s here): every worker updates its own Prometheus endpoint, and rank 0 sends a
record every `report_every` steps to the run's RunLog actor without waiting for it
(moco_ray.progress.Publisher). ray.train.report is called for the start, checkpoints and the end.
"""
import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch

from moco_ray import checkpoint, config, precision, storage, train_state
from moco_ray.metrics import EVENT, KNN_INIT_TOP1, KNN_PIXELS_TOP1, KNN_TOP1, Event
from moco_ray.records import LazyRecord, due
from moco_ray.sample_log import SampleLog

log = logging.getLogger("moco_ray")


def train_func(loop_config):
    """Runs on every Ray Train worker."""
    PretrainLoop(config.apply_overrides(config.Config(), loop_config["cfg"]), loop_config.get("run_log"),
           loop_config.get("run_dir")).run()


def learning_rate(cfg, batch_effective, progress):
    """lr at `progress` epochs (fractional): base lr scaled to the effective batch; a linear warmup
    from 0 during the first warmup_epochs (moco-v3's), then cosine over the remaining epochs or step."""
    lr = cfg.lr * batch_effective / 256
    warmup = cfg.warmup_epochs
    if progress < warmup:
        return lr * progress / warmup
    if cfg.schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min((progress - warmup) / (cfg.epochs - warmup), 1.0)))
    return lr * 0.1 ** sum(progress >= milestone for milestone in cfg.lr_steps)


@contextlib.contextmanager
def backbone_of(encoder):
    """The encoder without its head: the representation the kNN monitor and the export use."""
    head = encoder.fc
    encoder.fc = torch.nn.Identity()
    try:
        yield encoder
    finally:
        encoder.fc = head


def build_model(cfg):
    """The step module of cfg.method: moco_ray.step.MoCo (v1/v2), step_v3.MoCoV2Plus or step_v3.MoCoV3."""
    from moco_ray.step import MoCo
    from moco_ray.step_v3 import MoCoV2Plus, MoCoV3

    shared = dict(arch=cfg.arch, dim=cfg.dim, m=cfg.m, T=cfg.T, small_stem=cfg.small_stem, bn=cfg.bn,
                  bn_splits=cfg.bn_splits, precision=cfg.precision, channels_last=cfg.channels_last == "true",
                  width=cfg.width)
    if cfg.method == "v3":
        return MoCoV3(mlp_dim=cfg.mlp_dim, res=cfg.res, stop_grad_conv1=cfg.stop_grad_conv1, seed=cfg.seed, **shared)
    step = MoCoV2Plus if cfg.method == "v2plus" else MoCo
    return step(K=cfg.K, mlp=cfg.mlp, seed=cfg.seed, head_bn=cfg.head_bn, zero_init_residual=cfg.zero_init_residual,
                **shared)


def queue_age(queue, step):
    """Age in steps of the oldest key written by training (initial random keys, step -1, excluded;
    0 before any), as a 0-dim tensor on the queue's device: computing it waits for nothing."""
    return step - torch.where(queue.steps >= 0, queue.steps, step).amin()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss():
    """Restart this process's peak RSS (VmHWM) from its current RSS. Without it the peak of a
    spawned process includes its parent's RSS when it forked: Linux carries the forked image's
    high-water mark over exec into ru_maxrss."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes():
    """The peak RSS since the process started or since reset_peak_rss (VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _quiet_ray_train():
    """Our logger only, and without Ray Train's INFO line per report ("Reporting training result
    ... TrainingReport(...)", a long dict from every worker): warnings still show."""
    handler = logging.StreamHandler()
    rank = _ray_train().get_context().get_world_rank()
    handler.setFormatter(logging.Formatter(f"[moco_ray rank {rank}] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # moved in another Ray version: the lines come back, nothing breaks
        pass


def _ray_train():
    import ray.train

    return ray.train


class Loop:
    """One Ray Train worker's training loop, whatever it trains: its place in the group, the restore
    from the newest valid checkpoint, epochs of steps from the recorded sample position (the
    exactly-once order of moco_ray.data), the records to Prometheus and the run log, and sharded
    checkpoints. A subclass builds the model (build, to_device), takes one step (step), says what
    its checkpoints hold (state_dict, load_state, queue_state) and what it measures (measure,
    measure_due, measures; kept in its progress_type, a train_state.Progress)."""

    progress_type = train_state.Progress   # where the run stands (checkpointed): a subclass adds its measures
    aug = None           # the colour augmentation of the training views (moco_ray.augment)
    queue_size = None    # K when every rank checkpoints a queue shard
    loader_options = {}  # the subclass's make_train_loader options (views, raw_k)

    def __init__(self, cfg, run_log=None, run_dir=None):
        import ray.train.torch

        from moco_ray import data, metrics
        from moco_ray.progress import Publisher

        _quiet_ray_train()
        ctx = _ray_train().get_context()
        self.rank, self.W, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        self.device = ray.train.torch.get_device()
        self.cfg = cfg = config.for_device(cfg, self.device.type == "cuda")
        precision.configure_backends(self.device)
        self.b = cfg.batch_size // self.W
        self.B = self.b * self.W
        self.info = data.dataset_info(cfg.data)
        self.n = self.info["n"]

        torch.manual_seed(cfg.seed)
        self.progress = self.progress_type()
        self.run_dir = run_dir
        self.resumed_from = self.build_and_restore()
        self.progress.starts += 1
        self.group = self._group_number()
        torch.manual_seed(cfg.seed * 1_000_003 + self.progress.step * 1009 + self.rank)

        self.steps_per_epoch = self.n // self.B
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.meter = metrics.WorkerMetrics(cfg.metrics_port + local_rank, run=ctx.get_experiment_name(),
                                           rank=self.rank) if cfg.metrics_port else None
        self.publisher = Publisher(run_log) if run_log is not None and self.rank == 0 else None
        self.sample_log = SampleLog(cfg.sample_log, self.rank) if cfg.sample_log else None
        self.images_seen, self.t_run, self.last, self.measured_step = 0, time.perf_counter(), {}, None
        self.saves = checkpoint.SaveSchedule(cfg.checkpoint_every_steps, cfg.checkpoint_every_s, self.rank,
                                             self.W, self.device)

    def run(self):
        self.start()
        while not self.finished():
            if not self.train_epoch():
                break  # stopped by max_steps in the middle of the epoch
            self.end_epoch()
        self.end()

    # -- the hooks every loop defines, in the order a run first calls them ------------------------

    def build(self):
        """Create the model and optimizer on the CPU (weights random, nothing restored yet)."""
        raise NotImplementedError

    def to_device(self):
        """Move the model to self.device and wrap what trains in DDP, keeping Parameter identity."""
        raise NotImplementedError

    def load_state(self, state, shard):
        """Restore model, optimizer (and this rank's queue shard) from a checkpoint already on the device."""
        raise NotImplementedError

    def measures(self):
        """The measured numbers (None before the first), as they go into every record."""
        raise NotImplementedError

    def step(self, batch, epochs_done):
        """One optimizer step on the local batch; returns (loss, stats, lr); loss may stay on the device."""
        raise NotImplementedError

    def state_dict(self):
        """What a checkpoint holds of the model and optimizer (rank 0 saves it)."""
        raise NotImplementedError

    def measure_due(self, epoch, last_epoch):
        """Whether the end of `epoch` measures (kNN, top-1)."""
        raise NotImplementedError

    def measure(self):
        """Take the measurement and keep it in self.progress (checkpointed with the run)."""
        raise NotImplementedError

    def build_and_restore(self):
        """Build the model, move it to its device (and wrap it: to_device), then restore the
        checkpoint onto that device (moco_ray.train_state says why in this order); returns the
        checkpoint's path or None."""
        self.build()
        self.to_device()
        return self.restore()

    def restore(self):
        """Load the checkpoint rank 0 chose (choose_checkpoint) into the model already on its
        device, if there is one; returns its path. Every rank loads its own files of the same one."""
        path = checkpoint.agreed(self.choose_checkpoint, self.rank, self.W)
        if path is None:
            return None
        state, shard, _ = checkpoint.load(path, self.rank, self.W, self.queue_size, self.device)
        self.load_state(state, shard)
        train_state.check_placement(self.optimizer)
        self.progress = self.progress_type.from_dict(state["progress"])
        return path

    def choose_checkpoint(self):
        """Rank 0 only: the newest valid checkpoint of the run directory (without one: at or before
        the one Ray hands this group), hashes verified, as a str; None without one."""
        if self.run_dir:
            path, where = checkpoint.newest_valid(self.run_dir), self.run_dir
        else:
            latest = _ray_train().get_checkpoint()
            if latest is None:
                return None
            latest = storage.location_of(latest.filesystem, latest.path)
            path, where = checkpoint.find_valid(latest), latest.parent
        if path is None:
            if checkpoint.in_run(where):
                print(f"[moco_ray] no valid checkpoint under {where}: starting fresh")
            return None
        return str(path)

    def _group_number(self):
        """This group's number in its checkpoints' names: above every one in the run directory (rank
        0 decides), else the number of starts."""
        if not self.run_dir:
            return self.progress.starts
        return checkpoint.agreed(lambda: checkpoint.next_group(self.run_dir), self.rank, self.W)

    # ------------------------------------------------------------------------------------------------

    def start(self):
        p = self.progress
        start = {EVENT: Event.START, "world_size": self.W, "step": p.step, "epoch": p.epoch,
                 "resumed_from": self.resumed_from, "batch_effective": self.B,
                 "total_steps": self.total_steps, **self.measures(), "config": self.cfg.to_dict()}
        if self.publisher:  # first, so the driver sees it before this segment's step records
            self.publisher.send(start)
        _ray_train().report(start)

    def finished(self):
        return self.progress.epoch >= self.cfg.epochs or self.progress.step >= self.total_steps

    def train_epoch(self):
        """The rest of the current epoch; False when max_steps stopped it before the epoch's end."""
        from moco_ray import data

        cfg, p = self.cfg, self.progress
        epoch = p.epoch
        loader = data.make_train_loader(
            cfg.data, seed=cfg.seed, epoch=epoch, start=p.samples_in_epoch, batch_per_worker=self.b,
            rank=self.rank, world_size=self.W, res=cfg.res, aug=self.aug, device=self.device,
            num_workers=cfg.loader_workers, crop_min=cfg.crop_min, **self.loader_options)
        t_end = time.perf_counter()
        for batch in loader:   # (view q, view k, label, sample id)
            t_data = time.perf_counter()
            loss, stats, lr = self.step(batch, epoch + p.samples_in_epoch / self.n)
            if self.sample_log:
                self.sample_log.write(epoch, p.step, batch[-1])
            p.step += 1
            p.samples_in_epoch += self.B
            self.images_seen += self.b
            t_step = time.perf_counter()
            self.record(loss, stats, lr, epoch, t_step - t_end, t_data - t_end)
            t_end = t_step
            done = p.step >= self.total_steps
            epoch_ends = p.samples_in_epoch + self.B > self.n
            if not (done or epoch_ends) and self.saves.due(p.step):
                self.save(self.last)
            if done:
                break
        return p.samples_in_epoch + self.B > self.n

    def set_lr(self, epochs_done):
        lr = learning_rate(self.cfg, self.B, epochs_done)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    @property
    def last(self):
        """The newest step record, as checkpoints and the epoch's end report it: reading it reads
        the step's device values if no record read them yet (a wait for the device)."""
        return self._last.get()

    @last.setter
    def last(self, record):
        self._last = LazyRecord(record)

    def record(self, loss, stats, lr, epoch, step_time, data_wait):
        """This step's metrics, without waiting for the device on most steps. The host values (times,
        counts, lr) go to this worker's Prometheus endpoint every step; the device values (loss,
        accuracy, the subclass's step_fields) stay tensors and are read, in one copy, only when the
        record is due: every report_every steps (then Prometheus gets them, and rank 0 sends the
        record to the driver), or when a checkpoint or the epoch's end reads self.last. With
        report_every=0 Prometheus shows no loss, accuracy or queue age."""
        p = self.progress
        host = {
            EVENT: Event.STEP, "step": p.step, "epoch": epoch, "samples_in_epoch": p.samples_in_epoch,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "lr": lr, "images": self.images_seen,
            "step_time_s": step_time, "data_wait_s": data_wait,
            "data_wait_share": data_wait / max(step_time, 1e-9),
            "images_per_s": self.images_seen * self.W / (time.perf_counter() - self.t_run),
            "batch_effective": self.B, "world_size": self.W, "restarts": p.starts - 1,
            "skipped_steps": p.skipped_steps, **self.measures(),
            "rss_bytes": rss_bytes(),
        }
        if self.device.type == "cuda":
            host["gpu_memory_bytes"] = torch.cuda.memory_allocated(self.device)
        self._last = LazyRecord(host, {"loss": loss.detach(), "accuracy": stats["acc"]}, self.step_fields)
        if not due(p.step, self.cfg.report_every):
            if self.meter:
                self.meter.update(host)
            return
        if self.meter:
            self.meter.update(self.last)
        if self.publisher:
            self.publisher.send(self.last)

    def end_epoch(self):
        """Epoch bookkeeping, the measurement when it is due (and after the last epoch), and an
        epoch-end checkpoint when the save schedule says so or a measurement ran (its result reaches
        Ray, and Tune's schedulers, only with a checkpoint)."""
        p = self.progress
        p.epoch += 1
        p.samples_in_epoch = 0
        self.last["epoch"] = p.epoch
        measured = self.measure_due(p.epoch, last_epoch=p.epoch >= self.cfg.epochs)
        if measured:
            self.measure()
            self.last.update(self.measures())
            if self.meter:
                self.meter.update(self.last)
        if not self.finished() and (self.saves.due(p.step, epoch_end=True) or measured):
            self.save({**self.last, EVENT: Event.EPOCH})

    def end(self):
        p = self.progress
        if self.measured_step != p.step:
            self.measure()
        final = {**self.last, EVENT: Event.END, "epoch": p.epoch, "step": p.step, **self.measures(),
                 "train_s": time.perf_counter() - self.t_run}
        if self.publisher:
            self.publisher.drain()  # the step records go before the end record
        self.save(final)
        if self.sample_log:
            self.sample_log.close()
        if self.meter:
            self.meter.close()

    def save(self, metrics):
        """A sharded checkpoint (collective: every rank writes its part) reported to Ray with
        `metrics`; the run log gets the record, with the checkpoint's path, from the controller."""
        p = self.progress
        meta = {"step": p.step, "epoch": p.epoch, "samples_in_epoch": p.samples_in_epoch}
        state = {**self.state_dict(), "progress": p.to_dict(), "config": self.cfg.to_dict(), "seed": self.cfg.seed,
                 "world_size": self.W}
        ray_train = _ray_train()
        if self.sample_log:   # the audit holds every step this checkpoint covers
            self.sample_log.flush()
        with tempfile.TemporaryDirectory() as tmp:
            seconds = checkpoint.save(tmp, self.rank, self.W, state, self.queue_state(), meta)
            ray_train.report(dict(metrics, checkpoint_save_s=seconds),
                             checkpoint=ray_train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint.dir_name(p.step, self.group))
        self.saves.saved()

    def queue_state(self):
        return None

    def step_fields(self):
        """The subclass's own fields of a step record, read when the record is (device tensors are
        welcome: they are read with the loss)."""
        return {}


@dataclass
class PretrainProgress(train_state.Progress):
    """Pretraining's progress: kNN top-1 (%) of the query encoder, of the encoder at its random
    initialisation and of the raw pixels (None before the first, or without knn_data)."""
    knn_pixels_top1: Optional[float] = None
    knn_init_top1: Optional[float] = None
    knn_top1: Optional[float] = None


class PretrainLoop(Loop):
    """MoCo pretraining on one worker: model, optimizer, loss scaler, queue shard, kNN monitor."""

    progress_type = PretrainProgress
    loader_options = dict(raw_k=True)   # view k augmented in the step, after the shuffle

    def build(self):
        from moco_ray.optim import make_optimizer

        cfg = self.cfg
        self.aug, self.queue_size = cfg.aug, (None if cfg.method == "v3" else cfg.K)
        self.model = build_model(cfg)
        self.optimizer = make_optimizer(cfg.optimizer, self.model.encoder_q.parameters(), cfg.lr,
                                        cfg.momentum, cfg.weight_decay)
        self.scaler = precision.grad_scaler(cfg.precision, self.device.type)

    def set_lr(self, epochs_done):
        """The lr schedule (Loop.set_lr) and the key encoder's momentum schedule."""
        from moco_ray.optim import moco_momentum

        self.model.m = moco_momentum(self.cfg.m, self.cfg.m_schedule, epochs_done, self.cfg.epochs)
        return super().set_lr(epochs_done)

    def load_state(self, state, shard):
        train_state.load_moco_state(state, shard, self.model, self.optimizer, self.scaler)

    def state_dict(self):
        return train_state.moco_state(self.model, self.optimizer, self.scaler)

    def queue_state(self):
        return self.model.queue.state_dict() if self.model.queue is not None else None

    def to_device(self):
        from torch.nn.parallel import DistributedDataParallel

        self.model.to(self.device, memory_format=precision.memory_format(self.model.channels_last))
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model.encoder_q = DistributedDataParallel(self.model.encoder_q, device_ids=ids)
        self.encoder_q = self.model.encoder_q.module

    def start(self):
        p = self.progress
        if p.knn_init_top1 is None and p.step == 0:
            p.knn_init_top1 = self.monitor()
        if p.knn_pixels_top1 is None:   # no encoder: the same at any step, so also after a resume
            p.knn_pixels_top1 = self.monitor(pixels=True)
        super().start()

    def step(self, batch, epochs_done):
        """One step of Algorithm 1 (forward both encoders, InfoNCE, enqueue: MoCo.forward), then the
        SGD update of the query encoder; the loss is scaled for fp16. Returns (loss, stats, lr).
        View k arrives as uint8 (loader option raw_k) and is augmented after the shuffle; b above
        max_batch_per_worker is taken in micro-batches (moco_ray.step.micro_batches)."""
        from moco_ray.augment import augment
        from moco_ray.step import micro_batches

        im_q, im_k, _, _ = batch
        lr = self.set_lr(epochs_done)
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.method == "moco":
            loss, stats = self.model(im_q, im_k, self.progress.step, aug_k=lambda x: augment(x, self.cfg.aug, view=1),
                                     micro=micro_batches(self.b, self.cfg.max_batch_per_worker),
                                     backward=lambda part: self.scaler.scale(part).backward())
        else:   # v2+ and v3 feed both views to both encoders: view k is augmented before the step
            loss, stats = self.model(im_q, augment(im_k, self.cfg.aug, view=1), self.progress.step)
        if precision.backward_and_step(loss, self.optimizer, self.scaler):
            self.progress.skipped_steps += 1
        return loss, stats, lr

    def step_fields(self):
        if self.model.queue is None:
            return {"m": self.model.m}
        return {"queue_keys": len(self.model.queue),
                "queue_age_steps": queue_age(self.model.queue, self.progress.step),
                "m": self.model.m}

    def measure_due(self, epoch, last_epoch):
        """kNN every knn_every epochs and after the last; never with knn_every=0."""
        every = self.cfg.knn_every
        return bool(every) and (epoch % every == 0 or last_epoch)

    def measure(self):
        self.progress.knn_top1, self.measured_step = self.monitor(), self.progress.step

    def measures(self):
        p = self.progress
        return {KNN_TOP1: p.knn_top1, KNN_INIT_TOP1: p.knn_init_top1, KNN_PIXELS_TOP1: p.knn_pixels_top1}

    def monitor(self, pixels=False):
        """kNN top-1 (%) of the query encoder's backbone (pixels: of the raw input pixels, the
        baseline without an encoder); None without knn_data."""
        from moco_ray import data, knn

        cfg = self.cfg
        if not cfg.knn_data:
            return None
        batch = max(self.b, 64)   # forward only; after a shrink b can exceed what fits: capped like the step
        batch = min(batch, cfg.max_batch_per_worker or batch)
        bank = data.make_eval_loader(cfg.data, batch_size=batch, rank=self.rank, world_size=self.W,
                                     res=cfg.res, device=self.device, per_class=cfg.knn_bank_per_class,
                                     seed=cfg.seed)
        query = data.make_eval_loader(cfg.knn_data, batch_size=batch, rank=self.rank, world_size=self.W,
                                      res=cfg.res, device=self.device)
        if pixels:
            return knn.pixels_top1(bank, query, self.info["num_classes"], cfg.knn_k, cfg.knn_t, self.device,
                                   chunk=cfg.knn_chunk)
        # in fp32: the monitor runs every knn_every epochs
        with backbone_of(getattr(self.model, "base_encoder", self.encoder_q)) as backbone:
            return knn.knn_top1(backbone, bank, query, self.info["num_classes"], cfg.knn_k, cfg.knn_t,
                                self.device, chunk=cfg.knn_chunk)
