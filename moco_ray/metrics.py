"""The one metric vocabulary. Each training metric is named once here; the per-worker loop fills a
dict with these keys, which goes to the worker's Prometheus endpoint every step, from rank 0 to the
run's RunLog (metrics.jsonl, the driver's progress, the run report) every report_every steps, and
with every checkpoint to ray.train.report.

    python -m moco_ray.metrics        # the vocabulary as a Markdown table (the README's list)
"""
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("moco_ray")


@dataclass(frozen=True)
class Metric:
    key: str        # key in ray.train.report and in metrics.parquet
    kind: str       # counter | gauge | histogram (Prometheus type)
    unit: str
    help: str
    name: str       # Prometheus family name (a counter's sample is exposed as NAME_total)
    # exported only once a worker reports it (GPU memory on GPU workers, linear top-1 in moco_ray.lincls)
    optional: bool = False

    @property
    def samples(self):
        """The sample names a scrape shows for this metric."""
        if self.kind == "counter":
            return (self.name + "_total",)
        if self.kind == "histogram":
            return tuple(self.name + s for s in ("_bucket", "_sum", "_count"))
        return (self.name,)


PREFIX = "moco_"
DEFAULT_PORT = 9400  # worker i on a node serves on metrics_port + local_rank i

# Step and data-wait times span ~1 ms (a prefetched batch) to ~1 min (a CPU step of a big model).
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                float("inf"))

# The kNN measurements of pretraining: record keys that the loop writes and that the driver's
# progress, the run report, the trackers and the sweep (its default metric and baselines) read.
KNN_TOP1 = "knn_top1"                 # the query encoder's backbone
KNN_INIT_TOP1 = "knn_init_top1"       # the same encoder at its random initialisation, before the first step
KNN_PIXELS_TOP1 = "knn_pixels_top1"   # the raw pixels: the baseline without an encoder

VOCABULARY = [
    Metric("images", "counter", "images", "Images processed by this worker since it started",
           "moco_images"),
    Metric("step_time_s", "histogram", "seconds", "Wall time of one optimizer step, data wait included",
           "moco_step_time_seconds"),
    Metric("data_wait_s", "histogram", "seconds", "Time spent waiting for the next batch",
           "moco_data_wait_seconds"),
    Metric("images_per_s", "gauge", "images/s", "Global images/s (all workers) since this worker started",
           "moco_images_per_second"),
    Metric("step", "gauge", "steps", "Optimizer steps completed by the run (goes back after a restart)",
           "moco_step"),
    Metric("epoch", "gauge", "epochs", "Epochs completed (the 0-based index of the current epoch)", "moco_epoch"),
    Metric("loss", "gauge", "nats",
           "Loss of the last step (InfoNCE; cross-entropy of the linear classifier in moco_ray.lincls)",
           "moco_loss"),
    Metric("lr", "gauge", "1", "Learning rate of the last step", "moco_lr"),
    Metric("batch_effective", "gauge", "images", "Effective global batch b*W", "moco_batch_effective"),
    Metric("world_size", "gauge", "workers", "Number of training workers", "moco_world_size"),
    Metric("restarts", "counter", "restarts",
           "Worker-group restarts and resizes this run has gone through", "moco_restarts"),
    Metric("skipped_steps", "counter", "steps",
           "Optimizer steps skipped by the fp16 loss scaler (inf/nan gradients)", "moco_skipped_steps"),
    Metric("queue_keys", "gauge", "keys", "Keys held by this worker's queue shard", "moco_queue_keys"),
    Metric("queue_age_steps", "gauge", "steps", "Age of the oldest key in this shard, in steps",
           "moco_queue_age_steps"),
    Metric(KNN_TOP1, "gauge", "percent", "kNN top-1 accuracy of the query encoder (NaN before the first)",
           "moco_knn_top1_percent"),
    Metric("lincls_top1", "gauge", "percent",
           "Linear-evaluation top-1 on the validation split, last evaluation (NaN before the first)",
           "moco_lincls_top1_percent", optional=True),
    Metric("lincls_top5", "gauge", "percent", "Linear-evaluation top-5 on the validation split, last evaluation",
           "moco_lincls_top5_percent", optional=True),
    Metric("lincls_best_top1", "gauge", "percent", "Best linear-evaluation top-1 of the run so far",
           "moco_lincls_best_top1_percent", optional=True),
    Metric("rss_bytes", "gauge", "bytes", "Resident memory of the worker process", "moco_rss_bytes"),
    Metric("gpu_memory_bytes", "gauge", "bytes", "GPU memory allocated by torch (GPU workers only)",
           "moco_gpu_memory_bytes", optional=True),
]
BY_KEY = {m.key: m for m in VOCABULARY}
LABELS = ("run", "rank", "node")

EVENT = "event"   # the key of a record that says what wrote it: one of the Event values


class Event:
    """The values of a record's EVENT; every writer and reader (progress, report, trackers, the sweep's
    callbacks and results, the benches) names them from here."""
    START = "start"      # a worker group began: a fresh start, a restart or a resize (rank 0)
    STEP = "step"        # rank 0's record every report_every steps
    EPOCH = "epoch"      # an epoch end that saved a checkpoint
    END = "end"          # the run finished: the final measurements, with the last checkpoint
    FAILED = "failed"    # a linear evaluation gave up (moco_ray.lincls): its error


# Progress and bookkeeping fields that every report carries besides the metrics above.
PROGRESS_KEYS = (EVENT, "samples_in_epoch", "steps_per_epoch", "total_steps", "accuracy", "data_wait_share",
                 KNN_INIT_TOP1, KNN_PIXELS_TOP1, "resumed_from", "checkpoint_save_s", "train_s",
                 "lincls_best_epoch",
                 "sanity_checked_epochs", "error")


class WorkerMetrics:
    """A worker's Prometheus endpoint: every metric of VOCABULARY, labelled by run, rank and node.

    update(report) is cheap (one locked add/set/observe per metric) and runs every step; the HTTP
    server is a daemon thread of prometheus_client. A port that is taken is a warning and a retry in
    the background (for retry_s), never a crash: training matters more than its dashboard.
    """

    def __init__(self, port, run, rank, node=None, retry_s=30.0):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        self.labels = {"run": str(run), "rank": str(rank), "node": node or socket.gethostname()}
        self.families, self.series, self.counted = {}, {}, {}
        for m in VOCABULARY:
            if m.kind == "counter":
                family = Counter(m.name, m.help, LABELS, registry=self.registry)
            elif m.kind == "histogram":
                family = Histogram(m.name, m.help, LABELS, registry=self.registry, buckets=TIME_BUCKETS)
            else:
                family = Gauge(m.name, m.help, LABELS, registry=self.registry)
            self.families[m.key] = family
            if not m.optional:
                self._child(m)
        self.port = port
        self.server = self.thread = None
        self._closed = threading.Event()
        try:
            self.server, self.thread = start_http_server(port, registry=self.registry)
        except OSError as e:
            # Often the worker this one replaces (restart, resize) has not exited yet: keep trying
            # in the background for a while instead of delaying the training or giving up at once.
            log.warning("metrics: port %d is taken (%s); retrying for %.0f s", port, e, retry_s)
            threading.Thread(target=self._retry, args=(start_http_server, retry_s), daemon=True,
                             name="moco_ray-metrics-retry").start()

    def _retry(self, start_http_server, retry_s):
        deadline = time.monotonic() + retry_s
        while not self._closed.wait(1.0):
            try:
                self.server, self.thread = start_http_server(self.port, registry=self.registry)
                if self._closed.is_set():  # closed while binding
                    self.close()
                else:
                    log.warning("metrics: serving on port %d", self.port)
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    log.warning("metrics: cannot serve on port %d (%s); this worker exports no metrics",
                                self.port, e)
                    return

    def _child(self, m):
        child = self.families[m.key].labels(**self.labels)
        if m.kind == "gauge":
            child.set(math.nan)  # "no value yet", not a misleading 0
        self.series[m.key] = child
        return child

    def update(self, values):
        """values: a report dict; counters carry cumulative totals, gauges and histograms samples.
        Keys that are missing or None are left as they were."""
        for key, value in values.items():
            m = BY_KEY.get(key)
            if m is None or value is None:
                continue
            child = self.series.get(key) or self._child(m)
            if m.kind == "counter":
                delta = value - self.counted.get(key, 0)
                if delta > 0:
                    child.inc(delta)
                self.counted[key] = max(value, self.counted.get(key, 0))
            elif m.kind == "histogram":
                child.observe(value)
            else:
                child.set(value)

    def scrape(self):
        """The text a scrape of this endpoint returns (without HTTP)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self):
        self._closed.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def markdown_table():
    """The vocabulary as the README documents it."""
    rows = ["| Prometheus sample | type | unit | record key | meaning |", "|---|---|---|---|---|"]
    for m in VOCABULARY:
        sample = m.samples[0] if m.kind != "histogram" else m.name + "_{bucket,sum,count}"
        rows.append(f"| `{sample}` | {m.kind} | {m.unit} | `{m.key}` | {m.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
