"""The step path waits for the device at most once per report_every steps: augmentations of both
views, the MoCo step, SGD and the record (Prometheus every step, a record every report_every steps).
Counted on the CPU with moco_ray.syncs.HostSyncs (nonzero and mask indexing, item, copies back,
tolist standing for the copy back that it makes on a GPU)."""
import math
import time

import torch

from moco_ray import config as C
from moco_ray.augment import augment
from moco_ray.metrics import WorkerMetrics
from moco_ray.queue import KeyQueue
from moco_ray.syncs import HostSyncs
from moco_ray.worker import PretrainLoop, queue_age

STEPS = 20


class RayFreeWorker(PretrainLoop):
    """PretrainLoop.step and Loop.record as the loop runs them, without Ray Train: the attributes that
    Loop.__init__ sets for them, on one CPU worker."""

    def __init__(self, cfg, meter):
        self.cfg, self.device, self.rank, self.W = cfg, torch.device("cpu"), 0, 1
        self.b = self.B = cfg.batch_size
        self.n, self.steps_per_epoch, self.total_steps = 10 * self.B * STEPS, 10 * STEPS, STEPS
        torch.manual_seed(cfg.seed)
        self.build()
        self.encoder_q = self.model.encoder_q
        self.progress = self.progress_type(starts=1)
        self.meter, self.publisher = meter, None
        self.images_seen, self.t_run, self.last, self.measured_step = 0, time.perf_counter(), {}, None

    def train_step(self, views):
        """What Loop.train_epoch does around one step."""
        p = self.progress
        im_q, im_k = (augment(v, self.cfg.aug) for v in views)
        loss, stats, lr = self.step((im_q, im_k, None, None), p.samples_in_epoch / self.n)
        p.step += 1
        p.samples_in_epoch += self.B
        self.images_seen += self.b
        self.record(loss, stats, lr, 0, 0.01, 0.002)
        return loss


def test_the_step_path_reads_the_device_once_per_report_every():
    cfg = C.for_device(C.load("demo", ["batch_size=8", "K=32", "report_every=5", "aug=v2"]), cuda=False)
    meter = WorkerMetrics(0, run="syncs", rank=0)
    try:
        worker = RayFreeWorker(cfg, meter)
        views = torch.randint(0, 256, (2, cfg.batch_size, 3, cfg.res, cfg.res), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(0))
        losses, syncs_per_step = [], []
        with HostSyncs() as syncs:
            for _ in range(STEPS):
                before = syncs.count
                losses.append(worker.train_step(views).detach())
                syncs_per_step.append(syncs.count - before)
        assert syncs.count <= math.ceil(STEPS / cfg.report_every), dict(syncs.ops)
        # the reads are those of the due records (steps 5, 10, 15, 20): one copy each
        assert [s for s, n in enumerate(syncs_per_step, 1) if n] == [5, 10, 15, 20]

        # what is read is this step's: the record and Prometheus hold step 20's loss and queue age
        scrape = meter.scrape()
        last = worker.last
        assert last["step"] == STEPS and last["loss"] == losses[-1].item()
        # keys of the last K/b steps
        assert isinstance(last["queue_age_steps"], int) and last["queue_age_steps"] == cfg.K // cfg.batch_size
        assert 0.0 <= last["accuracy"] <= 1.0
        assert 'moco_loss{node="' in scrape and repr(last["loss"])[:8] in scrape
        assert 'moco_step_time_seconds_count{' in scrape and f"{float(STEPS)}" in scrape  # every step observed
    finally:
        meter.close()


def test_queue_age_is_the_age_of_the_oldest_written_key():
    queue = KeyQueue(6, 4)
    assert int(queue_age(queue, 3)) == 0                      # only the random initial keys
    for step in range(1, 5):                                  # 2 keys a step: the ring wraps at step 4
        queue.enqueue(torch.randn(2, 4), step)
        written = queue.steps[queue.steps >= 0]
        assert int(queue_age(queue, step + 1)) == step + 1 - int(written.min())
    assert queue.steps.tolist() == [4, 4, 2, 2, 3, 3] and int(queue_age(queue, 5)) == 3


def test_a_lazy_record_reads_its_device_values_once_in_one_copy():
    from moco_ray.records import LazyRecord

    calls = []
    record = LazyRecord({"step": 3}, {"loss": torch.tensor(1.5), "accuracy": 0.25},
                        lambda: calls.append(1) or {"age": torch.tensor(7)})
    with HostSyncs() as syncs:
        first, again = dict(record.get()), record.get()
    assert first == again == {"step": 3, "loss": 1.5, "accuracy": 0.25, "age": 7}
    assert isinstance(first["age"], int) and calls == [1] and dict(syncs.ops) == {"tolist": 1}
