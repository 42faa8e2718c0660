"""Driver-side bookkeeping of a run: every report is appended to RUN_DIR/metrics.jsonl (what
`moco_ray.report` reads), progress is printed, and every (re)start or resize gets one line."""
import json
import time
from pathlib import Path

import ray.train

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir):
    path = Path(run_dir) / METRICS_FILE
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressCallback(ray.train.UserCallback):
    """Runs in the Ray Train controller: sees rank 0's metrics of every report."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.world_size = None
        self.max_step = 0
        self.t0 = time.time()

    def after_report(self, run_context, metrics, checkpoint):
        m = dict(metrics[0]) if metrics else {}
        m["time"] = time.time()
        m["checkpoint"] = checkpoint.path if checkpoint is not None else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(m, default=str) + "\n")
        if m.get("event") == "start":
            self._started(m)
            return
        self.max_step = max(self.max_step, m.get("step", 0))
        print(self.line(m), flush=True)

    def _started(self, m):
        step, world = m["step"], m["world_size"]
        if self.world_size is None and m.get("resumed_from") is None:
            print(f"[moco_ray] started: world size {world}, global batch {m['batch_effective']}, "
                  f"{m['total_steps']} steps", flush=True)
        else:
            what = "resize" if self.world_size not in (None, world) else "restart"
            print(f"[moco_ray] {what}: world size {self.world_size} -> {world}, resumed from step {step} "
                  f"({m.get('resumed_from') or 'no checkpoint'}), {max(self.max_step - step, 0)} steps redone",
                  flush=True)
        self.world_size = world

    def line(self, m):
        total = m.get("total_steps") or 0
        elapsed = m["time"] - self.t0
        done = m.get("step", 0)
        eta = elapsed / done * (total - done) if done and total else float("nan")
        knn = m.get("knn_top1")
        return (f"[moco_ray] epoch {m.get('epoch')} step {done}/{total} "
                f"loss {m.get('loss', float('nan')):.4f} lr {m.get('lr', float('nan')):.4f} "
                f"{m.get('images_per_s', 0):.1f} img/s W={m.get('world_size')} "
                f"kNN {'-' if knn is None else f'{knn:.1f}%'} ETA {eta:.0f}s")
