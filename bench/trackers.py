"""Cost of --log-to on the RunLog's append: RunLog.record with no tracker, with TensorBoard, and with a
tracker that never returns, in one process, alternating so that drift hits all alike.

    .venv/bin/python bench/trackers.py                  # bursts of 2,000 records, 3 rounds
    .venv/bin/python bench/trackers.py --records 5000 --rounds 5

A burst is far faster than a run sends records (one per report_every steps), so the tracker threads
fall behind and drop: the numbers are the append's cost while a tracker thread competes for the GIL,
and how many records of a burst each tracker got.
"""
import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco_ray import config as C, trackers  # noqa: E402
from moco_ray.metrics import EVENT, Event  # noqa: E402
from moco_ray.progress import RunLog  # noqa: E402


class Hung(trackers.Tracker):
    """A tracker whose server never answers."""
    name = "hung"

    def __init__(self, run_dir):
        super().__init__(run_dir)
        self.release = threading.Event()

    def scalars(self, step, values, walltime):
        self.release.wait()


def burst(n):
    """n records as rank 0 sends them: a start with the config, then step records."""
    config = C.load("demo").to_dict()
    out = [{EVENT: Event.START, "world_size": 2, "step": 0, "total_steps": n, "config": config}]
    out += [{EVENT: Event.STEP, "step": s, "total_steps": n, "loss": 6.0 - s / n, "lr": 0.1, "world_size": 2,
             "images_per_s": 100.0, "step_time_s": 0.1, "data_wait_s": 0.01, "images": 32 * s}
            for s in range(1, n)]
    return out


def append_cost(make, records):
    """(seconds per RunLog.record, records the tracker got)."""
    with tempfile.TemporaryDirectory() as d:
        log = RunLog(d, trackers=make(d))
        t0 = time.perf_counter()
        for r in records:
            log.record(r)
        per_record = (time.perf_counter() - t0) / len(records)
        for t in log.trackers:
            getattr(t.tracker, "release", threading.Event()).set()
        stats = log.flush_trackers(60)
        got = {name: len(records) - s["dropped"] - s["errors"] for name, s in stats.items()}
        return per_record, got


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    import torch.utils.tensorboard  # noqa: F401  (the first import takes seconds: not an append's cost)

    records = burst(args.records)
    kinds = {"none": lambda d: [], "tensorboard": lambda d: [trackers.TensorBoardTracker(d)],
             "hung": lambda d: [Hung(d)]}
    costs, got = {k: [] for k in kinds}, {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind, make in kinds.items():
            c, g = append_cost(make, records)
            costs[kind].append(c)
            got[kind].append(g.get(kind, 0))
    base = statistics.median(costs["none"])
    for kind in kinds:
        med = statistics.median(costs[kind])
        print(f"{kind:12s} {med * 1e6:7.1f} us per record  {med / base:5.2f}x  "
              f"tracker got {statistics.median(got[kind]):.0f} of {len(records)}")


if __name__ == "__main__":
    main()
