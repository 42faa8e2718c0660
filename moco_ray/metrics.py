"""The one metric vocabulary. Each training metric is named once here; the per-worker loop fills a
dict with these keys, which goes both to ray.train.report and to the worker's Prometheus endpoint."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str        # key in ray.train.report and in metrics.parquet
    kind: str       # counter | gauge | histogram (Prometheus type)
    unit: str
    help: str


PREFIX = "moco_"

VOCABULARY = [
    Metric("images", "counter", "images", "Images processed by this worker since it started"),
    Metric("step_time_s", "histogram", "seconds", "Wall time of one optimizer step, data wait included"),
    Metric("data_wait_s", "histogram", "seconds", "Time spent waiting for the next batch"),
    Metric("loss", "gauge", "nats", "InfoNCE loss of the last step"),
    Metric("lr", "gauge", "1", "Learning rate of the last step"),
    Metric("batch_effective", "gauge", "images", "Effective global batch b*W"),
    Metric("world_size", "gauge", "workers", "Number of training workers"),
    Metric("restarts", "counter", "1", "Worker-group starts seen by this run (restarts and resizes)"),
    Metric("queue_keys", "gauge", "keys", "Keys held by this worker's queue shard"),
    Metric("queue_age_steps", "gauge", "steps", "Age of the oldest key in this shard, in steps"),
    Metric("knn_top1", "gauge", "percent", "kNN top-1 accuracy of the query encoder"),
    Metric("rss_bytes", "gauge", "bytes", "Resident memory of the worker process"),
    Metric("gpu_memory_bytes", "gauge", "bytes", "GPU memory allocated by torch (GPU workers only)"),
]

# Progress and bookkeeping fields that every report carries besides the metrics above.
PROGRESS_KEYS = ("step", "epoch", "samples_in_epoch", "steps_per_epoch", "total_steps", "images_per_s",
                 "accuracy", "data_wait_share", "event")


class WorkerMetrics:
    """A worker's Prometheus endpoint: every metric of VOCABULARY, labelled by run, rank and node."""

    def __init__(self, port, run, rank, node=None):
        import socket

        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        labels = {"run": run, "rank": str(rank), "node": node or socket.gethostname()}
        make = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
        self.series = {}
        for m in VOCABULARY:
            name = PREFIX + m.key.removesuffix("_s").removesuffix("_bytes")
            name += {"seconds": "_seconds", "bytes": "_bytes"}.get(m.unit, "")
            metric = make[m.kind](name, m.help, list(labels), registry=self.registry)
            self.series[m.key] = (m.kind, metric.labels(**labels))
        self.counted = {}
        self.server, self.thread = start_http_server(port, registry=self.registry)
        self.port = port

    def update(self, values):
        """values: a report dict; counters carry cumulative totals, gauges and histograms samples."""
        for key, (kind, series) in self.series.items():
            value = values.get(key)
            if value is None:
                continue
            if kind == "counter":
                series.inc(max(value - self.counted.get(key, 0), 0))
                self.counted[key] = value
            elif kind == "histogram":
                series.observe(value)
            else:
                series.set(value)

    def close(self):
        self.server.shutdown()
