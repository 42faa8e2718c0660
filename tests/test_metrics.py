"""Prometheus metrics: the vocabulary, one worker endpoint, and a 2-worker demo run scraped over HTTP
while it trains."""
import math
import re
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_ports
from moco_ray import metrics as M


def scrape(port, timeout=5):
    """{sample name: [(labels, value)]} of the moco_ samples at localhost:port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(M.PREFIX):
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, name, **labels):
    rows = [v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(rows) == 1, f"{name}{labels}: {rows}"
    return rows[0]


# ----------------------------------------------------------------------------------------------------
# The vocabulary
# ----------------------------------------------------------------------------------------------------

def test_vocabulary_is_one_consistent_table():
    keys = [m.key for m in M.VOCABULARY]
    names = [m.name for m in M.VOCABULARY]
    assert len(set(keys)) == len(keys) and len(set(names)) == len(names)
    for m in M.VOCABULARY:
        assert re.fullmatch(r"moco_[a-z0-9_]+", m.name), m.name
        assert m.kind in ("counter", "gauge", "histogram")
        assert m.help and m.unit
        assert not m.name.endswith("_total")  # prometheus_client adds it to counters
        if m.unit == "seconds":
            assert m.name.endswith("_seconds")
        if m.unit == "bytes":
            assert m.name.endswith("_bytes")
        assert m.key not in M.PROGRESS_KEYS
    # what the issue asks for, by kind
    kinds = {m.key: m.kind for m in M.VOCABULARY}
    assert kinds["images"] == kinds["restarts"] == "counter"
    assert kinds["step_time_s"] == kinds["data_wait_s"] == "histogram"
    for key in ("loss", "lr", "batch_effective", "world_size", "queue_keys", "queue_age_steps", "knn_top1",
                "rss_bytes", "gpu_memory_bytes"):
        assert kinds[key] == "gauge", key
    table = M.markdown_table()
    assert all(m.name in table and f"`{m.key}`" in table for m in M.VOCABULARY)


# ----------------------------------------------------------------------------------------------------
# One endpoint, no Ray
# ----------------------------------------------------------------------------------------------------

def report(step, **extra):
    return dict({"step": step, "epoch": 0, "loss": 7.0 - step / 10, "lr": 0.03, "images": 64 * step,
                 "step_time_s": 0.2, "data_wait_s": 0.002, "images_per_s": 640.0, "batch_effective": 128,
                 "world_size": 2, "restarts": 0, "queue_keys": 2048, "queue_age_steps": step,
                 "knn_top1": None, "rss_bytes": 1 << 30, "event": "step", "total_steps": 10}, **extra)


def test_worker_endpoint_types_labels_and_counters():
    port = free_ports()
    w = M.WorkerMetrics(port, run="r1", rank=3, node="node-a")
    try:
        before = scrape(port)
        assert math.isnan(value(before, "moco_loss"))  # no value yet
        assert value(before, "moco_images_total") == 0
        assert "moco_gpu_memory_bytes" not in before  # CPU worker: no GPU series at all

        w.update(report(1))
        w.update(report(2, restarts=1, knn_top1=55.5))
        s = scrape(port)
        for name, rows in s.items():
            for labels, _ in rows:
                assert {k: labels[k] for k in M.LABELS} == {"run": "r1", "rank": "3", "node": "node-a"}, name
        assert value(s, "moco_images_total") == 128  # cumulative totals, not summed
        assert value(s, "moco_restarts_total") == 1
        assert value(s, "moco_step_time_seconds_count") == 2
        assert value(s, "moco_step_time_seconds_sum") == pytest.approx(0.4)
        assert value(s, "moco_data_wait_seconds_bucket", le="0.0025") == 2
        assert value(s, "moco_loss") == pytest.approx(6.8)
        assert value(s, "moco_knn_top1_percent") == 55.5
        assert value(s, "moco_world_size") == 2
        assert value(s, "moco_queue_keys") == 2048
        assert value(s, "moco_rss_bytes") == 1 << 30
        types = {f.name: f.type for f in text_string_to_metric_families(w.scrape())}
        for m in M.VOCABULARY:
            if not m.optional:
                assert types[m.name] == m.kind, m.name

        # A GPU worker reports gpu_memory_bytes: the series appears.
        w.update(report(3, gpu_memory_bytes=5 << 20))
        assert value(scrape(port), "moco_gpu_memory_bytes") == 5 << 20
        # A counter never goes back (a smaller cumulative value, e.g. a re-sent report, adds nothing).
        w.update(report(2))
        assert value(scrape(port), "moco_images_total") == 192
    finally:
        w.close()


def test_port_in_use_is_a_warning_and_a_retry_not_a_crash(caplog):
    port = free_ports()
    first = M.WorkerMetrics(port, run="r", rank=0)
    second = M.WorkerMetrics(port, run="r", rank=1, retry_s=10)
    try:
        assert second.server is None and f"port {port} is taken" in caplog.text
        second.update(report(1))  # still usable
        first.close()  # e.g. the worker it replaces exits: the retry takes the port over
        deadline = time.time() + 10
        while second.server is None and time.time() < deadline:
            time.sleep(0.1)
        assert value(scrape(port), "moco_images_total", rank="1") == 64
    finally:
        first.close()
        second.close()


# ----------------------------------------------------------------------------------------------------
# A 2-worker demo run, scraped while it trains
# ----------------------------------------------------------------------------------------------------

def test_two_workers_are_scraped_while_training(ray_session, tmp_path):
    from moco_ray import config as C
    from moco_ray import launch

    base = free_ports(2)
    # Each endpoint must be scraped twice, with progress between, while the workers train; the values
    # move at each report (a barrier of ~1.6 s every 2 steps): 12 steps give 6 reports, enough changes
    # for a rank whose endpoint comes up late to be seen moving.
    cfg = launch.resolve_data(C.load("demo", ["max_steps=12", "batch_size=32", "report_every=2",
                                             "checkpoint_every_steps=1000",
                                             f"metrics_port={base}", "knn_every=0"]))
    cfg = C.apply_overrides(cfg, {"knn_data": ""})
    name = "scrape-test"
    trainer = launch.make_trainer(cfg, 2, False, tmp_path, name)
    box = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # surfaced by the assertions below
            box["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()

    first, second = {}, {}
    deadline = time.time() + 420
    while thread.is_alive() and time.time() < deadline and len(second) < 2:
        for port in (base, base + 1):
            if port in second:
                continue
            try:
                s = scrape(port, timeout=2)
            except OSError:
                continue  # not up yet
            images = value(s, "moco_images_total")
            if port not in first:
                if images > 0:
                    first[port] = s
            elif images > value(first[port], "moco_images_total"):
                second[port] = s
        time.sleep(0.05)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert len(second) == 2, f"scraped twice with progress: {sorted(second)} of {[base, base + 1]}"

    ranks = set()
    for port in (base, base + 1):
        a, b = first[port], second[port]
        labels = a["moco_images_total"][0][0]
        assert labels["run"] == name and labels["node"] == socket.gethostname()
        ranks.add(labels["rank"])
        for s in (a, b):  # every sample of an endpoint carries the same labels
            assert all({k: lab[k] for k in M.LABELS} == {k: labels[k] for k in M.LABELS}
                       for rows in s.values() for lab, _ in rows)
        # counters rise between the two scrapes
        assert value(b, "moco_images_total") > value(a, "moco_images_total")
        assert value(b, "moco_step_time_seconds_count") > value(a, "moco_step_time_seconds_count")
        assert value(b, "moco_data_wait_seconds_count") > value(a, "moco_data_wait_seconds_count")
        assert value(b, "moco_restarts_total") >= value(a, "moco_restarts_total") >= 0
        assert value(b, "moco_step") > value(a, "moco_step")
        # gauges are the run's
        assert value(b, "moco_world_size") == 2
        assert value(b, "moco_batch_effective") == cfg.batch_size
        assert math.isfinite(value(b, "moco_loss")) and value(b, "moco_lr") > 0
        assert value(b, "moco_queue_keys") > 0 and value(b, "moco_rss_bytes") > 0
        assert "moco_gpu_memory_bytes" not in b  # CPU workers
    assert ranks == {"0", "1"}

    # One vocabulary: the same keys went to ray.train.report.
    final = box["result"].metrics
    missing = [m.key for m in M.VOCABULARY if not m.optional and m.key not in final]
    assert not missing, f"reported without {missing}"


# ----------------------------------------------------------------------------------------------------
# The run log: rank 0's records never wait for it
# ----------------------------------------------------------------------------------------------------

def test_a_slow_or_dead_run_log_never_blocks_the_publisher(ray_session, tmp_path):
    import ray

    from moco_ray.progress import METRICS_FILE, Publisher, RunLog, read_metrics, start_run_log

    class SlowRunLog(RunLog):
        def record(self, m):
            time.sleep(30)
            super().record(m)

    slow = ray.remote(num_cpus=0)(SlowRunLog).remote(str(tmp_path / "slow"))
    publisher = Publisher(slow)
    for step in range(200):  # returns at once: beyond MAX_IN_FLIGHT records are dropped, not queued
        publisher.send({"event": "step", "step": step})
    assert publisher.dropped == 200 - Publisher.MAX_IN_FLIGHT

    dead = start_run_log(tmp_path / "dead")
    publisher = Publisher(dead)
    publisher.send({"event": "step", "step": 1})
    publisher.drain()
    assert read_metrics(tmp_path / "dead")[0]["step"] == 1
    ray.kill(dead)  # asynchronous: wait until the actor is gone
    with pytest.raises(ray.exceptions.RayActorError):
        for _ in range(600):
            ray.get(dead.__ray_ready__.remote())
            time.sleep(0.1)
    for step in range(2, 100):
        publisher.send({"event": "step", "step": step})
    publisher.drain(timeout_s=5)
    assert len((tmp_path / "dead" / METRICS_FILE).read_text().splitlines()) == 1
    ray.kill(slow)


def test_docs_list_the_vocabulary_as_python_m_moco_ray_metrics_prints_it():
    from pathlib import Path

    # the README's observability section lives in docs/observability.md
    docs = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    assert M.markdown_table() in docs
