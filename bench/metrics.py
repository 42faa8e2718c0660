"""Overhead of the Prometheus metrics: training steps/s with metrics_port on against 0, in one run.

    .venv/bin/python bench/metrics.py                       # demo, 2 CPU workers, 40 steps per trial
    .venv/bin/python bench/metrics.py --steps 100 --repeats 2 --use-gpu

One Ray session runs trials alternating off, on, off, on, ... (so drift hits both alike), each a short
demo training without kNN or checkpoints. While metrics are on, a scraper pulls every worker's
endpoint once a second (Prometheus usually scrapes every 15-30 s: this is the pessimistic case).
steps/s of a trial = the run's final images/s (measured in the worker from its first step to its
last) / global batch. It also times WorkerMetrics.update() and one scrape alone, which bounds the
overhead far below the noise of two short trainings.
"""
import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco_ray import config as C  # noqa: E402
from moco_ray import metrics as M  # noqa: E402


def free_base_port(n):
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("", 0))
            base = s.getsockname()[1]
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def micro(n=20000):
    """Seconds per WorkerMetrics.update() of a full report, and per scrape."""
    w = M.WorkerMetrics(free_base_port(1), run="bench", rank=0)
    try:
        values = {"step": 1, "epoch": 0, "loss": 7.0, "lr": 0.03, "images": 0, "step_time_s": 0.2,
                  "data_wait_s": 0.001, "images_per_s": 600.0, "batch_effective": 128, "world_size": 2,
                  "restarts": 0, "queue_keys": 2048, "queue_age_steps": 31, "knn_top1": 40.0,
                  "rss_bytes": 1 << 30, "gpu_memory_bytes": 1 << 30, "accuracy": 0.5, "data_wait_share": 0.01,
                  M.EVENT: M.Event.STEP, "total_steps": 100, "samples_in_epoch": 0, "steps_per_epoch": 10}
        t0 = time.perf_counter()
        for i in range(n):
            values["images"] = 64 * i
            values["step"] = i
            w.update(values)
        update_s = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for _ in range(200):
            urllib.request.urlopen(f"http://127.0.0.1:{w.port}/metrics").read()
        scrape_s = (time.perf_counter() - t0) / 200
    finally:
        w.close()
    return update_s, scrape_s


def trial(cfg, workers, use_gpu, storage, name, port):
    from moco_ray import launch

    cfg = C.apply_overrides(cfg, {"metrics_port": port})
    trainer = launch.make_trainer(cfg, workers, use_gpu, storage, name)
    stop, scrapes = threading.Event(), [0]

    def scraper():
        while not stop.wait(1.0):
            for p in range(port, port + workers):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=2).read()
                    scrapes[0] += 1
                except OSError:
                    pass

    thread = threading.Thread(target=scraper, daemon=True)
    if port:
        thread.start()
    try:
        m = trainer.fit().metrics
    finally:
        stop.set()
    return m["images_per_s"] / m["batch_effective"], m["step_time_s"], scrapes[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per trial")
    p.add_argument("--repeats", type=int, default=1, help="trials per setting (alternating)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = p.parse_args()

    update_s, scrape_s = micro()
    print(f"WorkerMetrics.update(): {update_s * 1e6:.1f} us per step; one scrape: {scrape_s * 1e3:.2f} ms")

    import ray

    from moco_ray import launch

    launch.start_ray(num_cpus=max(args.workers, 2), num_gpus=args.workers if args.use_gpu else 0,
                    include_dashboard=False, log_to_driver=False)
    cfg = launch.resolve_data(C.load("demo", [f"max_steps={args.steps}", "report_every=10",
                                             "checkpoint_every_steps=100000", "knn_every=0", *args.set]))
    cfg = C.apply_overrides(cfg, {"knn_data": ""})
    rates = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as storage:
        for r in range(args.repeats):
            for mode in ("off", "on"):
                port = free_base_port(args.workers) if mode == "on" else 0
                rate, _, scrapes = trial(cfg, args.workers, args.use_gpu, storage, f"{mode}-{r}", port)
                rates[mode].append(rate)
                extra = f", {scrapes} scrapes" if mode == "on" else ""
                print(f"trial {r} metrics {mode:3s}: {rate:.3f} steps/s{extra}", flush=True)
    ray.shutdown()

    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    step_s = 1 / off
    spread = lambda v: f"median of {len(v)}, range {min(v):.3f}-{max(v):.3f}"
    print(f"\nmetrics_port=0  : {off:.3f} steps/s ({spread(rates['off'])})")
    print(f"metrics_port on : {on:.3f} steps/s ({spread(rates['on'])})")
    print(f"ratio on/off    : {on / off:.3f}")
    print(f"update() share of a step: {update_s / step_s * 100:.4f} % "
          f"({update_s * 1e6:.1f} us of {step_s * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
