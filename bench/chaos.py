"""Faults in series: one elastic run through a seeded schedule of faults, then the audit.

    python bench/chaos.py                              # 12 faults, seed 0 (~15 min on 2 cores)
    python bench/chaos.py --faults 20 --seed 3
    python bench/chaos.py --schedule worker_kill,node_remove,node_add,save_kill --epochs 2

One `python -m moco_ray.train --resume auto --num-workers 1:3` run (the demo model on the digits) on
a ray.cluster_utils.Cluster of 1-CPU nodes (a head without CPUs, two worker nodes at the start), and
faults at seeded intervals, some shorter than a restart (the next fault finds the group restarting):

    worker_kill   SIGKILL of a training worker
    node_remove   a worker node is removed (never the last one)
    node_add      a 1-CPU node joins (at most three)
    save_kill     SIGKILL of a worker while its group saves a checkpoint
    corrupt       bytes of the newest valid checkpoint overwritten
    driver_kill   SIGKILL of the driver; the same command again (--resume auto)

Then one row per fault (world size before and after, steps redone, seconds until the next step)
and the totals: faults survived, run finished, final step, every sample of every epoch consumed
exactly once (the sample log), every queue key written by training in the checkpoints after K/B steps.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moco_ray import checkpoint  # noqa: E402
from moco_ray.metrics import EVENT, Event  # noqa: E402
from moco_ray.progress import read_metrics  # noqa: E402
from moco_ray.sample_log import exactly_once_problems  # noqa: E402

KINDS = ("worker_kill", "node_remove", "node_add", "save_kill", "corrupt", "driver_kill")
MAX_NODES = 3
B, K, EVERY = 48, 384, 10  # global batch (any W of 1..3 divides it), queue, checkpoint interval


def gap(rng):
    """What comes before a fault: a third of the time 1-4 seconds, shorter than a restart (the
    fault finds the group restarting from the previous one); else 4-12 steps of training, so that
    the schedule spans the run however fast the machine is."""
    return ("s", round(rng.uniform(1, 4), 1)) if rng.random() < 1 / 3 else ("steps", rng.randint(4, 12))


RESTARTS = ("worker_kill", "node_remove", "save_kill", "driver_kill")  # faults that restart the group


def make_schedule(seed, n, kinds=KINDS, nodes=2):
    """n faults, every kind at least once, in a seeded order in which removals never take the last
    worker node, additions never pass MAX_NODES and a restart follows the last corruption (which
    only shows when a group resumes), each after a seeded gap."""
    rng = random.Random(seed)
    draws = list(kinds) + rng.choices(kinds, k=max(n - len(kinds), 0))
    while True:
        rng.shuffle(draws)
        count, ok = nodes, True
        for kind in draws:
            count += (kind == "node_add") - (kind == "node_remove")
            ok &= 1 <= count <= MAX_NODES
        last = {k: i for i, k in enumerate(draws)}
        if ok and max(last.get(k, -1) for k in RESTARTS) > last.get("corrupt", -1):
            break
    return [(kind, gap(rng)) for kind in draws]


def driver_command(cluster, out, epochs):
    from data_prep.demo import build_demo, default_demo_root

    digits = build_demo(default_demo_root("digits"), "digits")   # its timings were measured on the digits
    sets = [f"data={digits['train']}", "knn_data=", "knn_every=0", f"batch_size={B}", f"K={K}",
            f"epochs={epochs}", f"checkpoint_every_steps={EVERY}", "keep_checkpoints=3", "report_every=1",
            f"sample_log={out / 'samples'}"]
    return [sys.executable, "-m", "moco_ray.train", "--address", cluster.address, "--storage-path", str(out),
            "--name", "chaos", "--resume", "auto", "--num-workers", "1:3", "--max-failures", "1000",
            "--resize-interval-s", "2", "--use-gpu", "false", *(a for s in sets for a in ("--set", s))]


class Chaos:
    """The cluster, the driver, and the faults."""

    def __init__(self, out, epochs, seed):
        from ray.cluster_utils import Cluster

        self.out, self.run_dir, self.rng = out, out / "chaos", random.Random(seed + 1)
        for attempt in range(3):  # Ray gives a raylet a fixed 30 s to register: a loaded machine can miss it
            try:
                self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
                break
            except Exception as e:
                if attempt == 2:
                    raise
                print(f"[chaos] the head did not start ({e}); again", flush=True)
        self.nodes = [self.cluster.add_node(num_cpus=1) for _ in range(2)]
        self.command = driver_command(self.cluster, out, epochs)
        self.log = open(out / "driver.log", "ab")
        self.driver = None
        self.t0 = time.time()
        self.start_driver()

    def start_driver(self):
        self.driver = subprocess.Popen(self.command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    def training_workers(self, node=None):
        """(pid, node) of the live Ray Train workers, found under our own nodes' raylets."""
        found = []
        for n in [node] if node else self.nodes:
            raylet = psutil.Process(n.all_processes["raylet"][0].process.pid)
            for p in raylet.children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        found.append((p.pid, n))
                except psutil.Error:
                    pass
        return found

    def wait_for(self, what, predicate, timeout=300):
        t0 = time.time()
        while time.time() - t0 < timeout:
            value = predicate()
            if value:
                return value
            if self.driver.poll() is not None:
                raise TimeoutError(f"the run ended before a {what}")
            time.sleep(0.05)
        raise TimeoutError(f"no {what} within {timeout} s")

    def wait_gap(self, gap):
        """Sleep for ("s", seconds), or wait for ("steps", n) more step records in the run log."""
        unit, n = gap
        if unit == "s":
            time.sleep(n)
            return
        path = self.run_dir / "metrics.jsonl"
        offset = path.stat().st_size if path.exists() else 0

        def steps_since():
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read().count(json.dumps({EVENT: Event.STEP})[1:-1].encode()) >= n

        self.wait_for(f"{n} more steps", steps_since, timeout=900)

    def inject(self, kind):
        """Inject one fault; returns a note on what was hit."""
        return getattr(self, kind)()

    def worker_kill(self):
        pid, node = self.rng.choice(self.wait_for("training worker", self.training_workers))
        os.kill(pid, signal.SIGKILL)
        return f"pid {pid}"

    def node_remove(self):
        busy = {n for _, n in self.training_workers()}
        node = self.rng.choice(sorted(busy, key=self.nodes.index) or self.nodes)
        self.cluster.remove_node(node)
        self.nodes.remove(node)
        return f"{len(busy)} busy nodes, {len(self.nodes)} left"

    def node_add(self):
        self.nodes.append(self.cluster.add_node(num_cpus=1))
        return f"{len(self.nodes)} nodes"

    def save_kill(self):
        """Wait until the newest segment's sample log shows a step that a save follows, then kill."""
        def saving():
            segments = sorted((self.out / "samples").glob("samples-*.jsonl"))
            if not segments:
                return None
            newest = segments[-1].name.split("-")[1]
            for f in (self.out / "samples").glob(f"samples-{newest}-*.jsonl"):
                lines = f.read_bytes().rsplit(b"\n", 2)
                last = json.loads(lines[-2]) if len(lines) >= 2 and lines[-2] else None
                if last and (last["step"] + 1) % EVERY == 0 and psutil.pid_exists(last["pid"]):
                    return last
            return None

        last = self.wait_for("checkpoint save", saving, timeout=180)
        os.kill(last["pid"], signal.SIGKILL)
        time.sleep(1.0)  # what the save left behind
        saved = [p for p in checkpoint.in_run(self.run_dir) if checkpoint._order(p)[0] == last["step"] + 1]
        state = "valid" if saved and checkpoint.first_valid(saved[:1]) else "incomplete" if saved else "not written"
        return f"rank {last['rank']} at the save of step {last['step'] + 1} ({state})"

    def corrupt(self):
        path = self.wait_for("valid checkpoint", lambda: checkpoint.newest_valid(self.run_dir))
        with open(path / checkpoint.STATE, "r+b") as f:
            f.seek(f.seek(0, 2) // 2)
            f.write(b"chaos!")
        return f"{path.name}"

    def driver_kill(self):
        os.killpg(self.driver.pid, signal.SIGKILL)
        self.driver.wait()
        self.start_driver()
        return f"pid {self.driver.pid} started"

    def close(self):
        if self.driver.poll() is None:
            os.killpg(self.driver.pid, signal.SIGKILL)
            self.driver.wait()
        self.cluster.shutdown()
        self.log.close()


def rows_of(faults, records, end_time):
    """One row per fault from the run's records: world size before/after, steps redone by the
    (re)starts until the next fault, seconds until the first step after them."""
    starts = [r for r in records if r.get(EVENT) == Event.START]
    steps = [r for r in records if r.get(EVENT) == Event.STEP]
    rows = []
    for i, (kind, t, note) in enumerate(faults):
        t_next = faults[i + 1][1] if i + 1 < len(faults) else end_time
        before = [s for s in starts if s["time"] <= t]
        window = [s for s in starts if t < s["time"] <= t_next]
        redone = [max([r["step"] for r in steps if r["time"] < s["time"]], default=0) - s["step"] for s in window]
        # The next step of training: after a fault that restarts the group, one of the group that
        # starts next (records of the killed group may still arrive); else any.
        after = next((s["time"] for s in starts if s["time"] > t), None) if kind in RESTARTS else t
        first = next((r for r in steps if r["time"] > after), None) if after else None
        rows.append(dict(kind=kind, t=t, note=note, before=before[-1]["world_size"] if before else None,
                         after=window[-1]["world_size"] if window else before[-1]["world_size"] if before else None,
                         resumed=window[-1]["step"] if window else None, restarts=len(window),
                         redone=sum(max(x, 0) for x in redone), next_step_s=first["time"] - t if first else None,
                         survived=first is not None))
    return rows


def queue_problems(run_dir):
    """Checkpoints after K/B steps whose queue still holds a random initial key (step -1)."""
    import torch

    checked, bad = 0, []
    for path in checkpoint.in_run(run_dir):
        try:
            manifest = checkpoint.verify(path)
        except checkpoint.CheckpointError:
            continue
        if manifest["step"] < K // B:
            continue
        checked += 1
        for r in range(manifest["world_size"]):
            with (path / checkpoint.queue_file(r)).open_input() as f:   # path: a storage.Location
                shard = torch.load(f, map_location="cpu")
            if (shard["steps"] < 0).any():
                bad.append(f"{path.name} shard {r}")
    return checked, bad


def summarize(rows, records, run_dir, out, epochs, rc):
    from moco_ray.data import dataset_info

    n = dataset_info(json.loads((run_dir / "run_config.json").read_text())["data"])["n"]
    planned = n // B * epochs
    end = [r for r in records if r.get(EVENT) == Event.END]
    checked, bad_queue = queue_problems(run_dir)
    redone = [r["redone"] for r in rows]
    return dict(
        faults_injected=len(rows), faults_survived=sum(r["survived"] or bool(end) for r in rows),
        finished=rc == 0 and bool(end), final_step=end[-1]["step"] if end else None, planned_steps=planned,
        exactly_once_problems=exactly_once_problems(out / "samples", n, B, epochs),
        queue_checkpoints_checked=checked, queue_problems=bad_queue,
        max_steps_redone=max(redone, default=0), mean_steps_redone=sum(redone) / max(len(redone), 1))


def print_report(rows, summary):
    fmt = lambda v, f="": "-" if v is None else format(v, f)
    print(f"{'#':>2} {'fault':<12} {'t (s)':>6} {'W before':>8} {'W after':>7} {'restarts':>8} "
          f"{'resumed at':>10} {'redone':>6} {'next step (s)':>13}  what")
    for i, r in enumerate(rows, 1):
        print(f"{i:>2} {r['kind']:<12} {r['t']:>6.1f} {fmt(r['before']):>8} {fmt(r['after']):>7} "
              f"{r['restarts']:>8} {fmt(r['resumed']):>10} {r['redone']:>6} {fmt(r['next_step_s'], '.1f'):>13}  "
              f"{r['note']}")
    s = summary
    print(f"\nfaults survived        {s['faults_survived']} / {s['faults_injected']}")
    print(f"run finished           {'yes' if s['finished'] else 'no'}")
    print(f"final step = planned   {s['final_step']} / {s['planned_steps']}")
    print(f"samples exactly once   {'yes' if not s['exactly_once_problems'] else s['exactly_once_problems']}")
    print(f"queue keys by training {'yes' if not s['queue_problems'] else s['queue_problems']} "
          f"({s['queue_checkpoints_checked']} checkpoints after K/B = {K // B} steps)")
    print(f"steps redone           max {s['max_steps_redone']}, mean {s['mean_steps_redone']:.1f}")


def run(out, schedule, epochs, seed, timeout_s):
    """Run the schedule; returns (rows, summary)."""
    chaos = Chaos(out, epochs, seed)
    faults = []
    try:
        chaos.wait_for("first checkpoint", lambda: checkpoint.in_run(chaos.run_dir), timeout=300)
        for kind, gap in schedule:
            try:
                chaos.wait_gap(gap)
                t = time.time()
                note = chaos.inject(kind)
            except TimeoutError as e:  # nothing to hit (e.g. the run ended meanwhile): not injected
                print(f"[chaos] {kind} not injected: {e}", flush=True)
                continue
            faults.append((kind, t, f"after {gap[1]} {gap[0]}: {note}"))
            print(f"[chaos] {t - chaos.t0:6.1f} s  {kind:<12} {note}", flush=True)
        rc = chaos.driver.wait(timeout=timeout_s)
    finally:
        chaos.close()
    records = read_metrics(chaos.run_dir)
    rows = rows_of(faults, records, time.time())
    for r in rows:
        r["time"], r["t"] = r["t"], r["t"] - chaos.t0
    return rows, summarize(rows, records, chaos.run_dir, out, epochs, rc)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default=None, help="comma-separated kinds instead of a seeded draw")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--out", default=None, help="where the run goes (default: a new temporary directory)")
    p.add_argument("--json", default=None, help="also write the rows and totals here")
    p.add_argument("--timeout-s", type=float, default=900, help="for the run's end after the last fault")
    args = p.parse_args(argv)
    if args.schedule:
        kinds = args.schedule.split(",")
        unknown = set(kinds) - set(KINDS)
        if unknown:
            p.error(f"unknown fault kinds {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
        rng = random.Random(args.seed)
        schedule = [(k, gap(rng)) for k in kinds]
    else:
        schedule = make_schedule(args.seed, args.faults)
    import tempfile

    out = Path(args.out or tempfile.mkdtemp(prefix="moco-chaos-")).absolute()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"
    os.environ.pop("RAY_ADDRESS", None)
    t0 = time.time()
    rows, summary = run(out, schedule, args.epochs, args.seed, args.timeout_s)
    print_report(rows, summary)
    print(f"wall time              {time.time() - t0:.0f} s; run in {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    ok = summary["finished"] and summary["final_step"] == summary["planned_steps"] and not (
        summary["exactly_once_problems"] or summary["queue_problems"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
