"""Bookkeeping and live progress of a run.

- RunLog is the one writer of RUN_DIR's metrics record (metrics.jsonl on a local disk; rolling parts
  metrics.jsonl, metrics-00001.jsonl, ... on an object store, each visible at most 5 s after its
  record: moco_ray.record_parts), what `moco_ray.report` reads: a Ray actor on
  the driver's node that takes records from two sources and prints one line per start, restart and
  resize. Rank 0 sends its start record and a step record every `report_every` steps through a
  Publisher, which never waits (at most MAX_IN_FLIGHT records in flight, the rest dropped and
  counted), so a slow or dead RunLog never stalls the step. ProgressCallback, in the Ray Train
  controller, forwards the reports that carry a checkpoint (epoch ends, periodic saves, the end),
  with the checkpoint's path. With --log-to, the RunLog hands every record to the run's trackers
  (moco_ray.trackers), each on its own thread, never waited for.
- watch(run_dir, fit_fn) runs on the driver: it calls fit_fn() (trainer.fit) in the calling thread
  and, meanwhile, tails RUN_DIR's metrics parts from a daemon thread and shows the progress: a tqdm bar
  when stdout is a terminal, one line per report when it is not (`ray job logs`, CI).
"""
import io
import math
import os
import sys
import threading
import time

import ray
import ray.train

from moco_ray import storage
from moco_ray.metrics import EVENT, KNN_TOP1, Event
from moco_ray.record_parts import PartTail, PartWriter, read_records

METRICS_STEM = "metrics"   # RUN_DIR/metrics.jsonl (+ metrics-00001.jsonl, ... on an object store)
METRICS_FILE = METRICS_STEM + ".jsonl"
PREFIX = "[moco_ray]"


def read_metrics(run_dir):
    """Every record of RUN_DIR's metrics parts (a path or URI), in the order written (a torn last
    line is skipped); [] before the first."""
    return read_records(run_dir, METRICS_STEM)


def is_step_report(m):
    return m.get(EVENT) != Event.START and m.get("step") is not None and m.get("total_steps")


def format_eta(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    mins, s = divmod(rest, 60)
    return f"{h}h{mins:02d}m" if h else f"{mins}m{s:02d}s" if mins else f"{s}s"


def epochs_of(m):
    """(fractional epochs done, epochs in the run) from a step report."""
    spe = m.get("steps_per_epoch") or 0
    if not spe:
        return m.get("epoch"), None
    return m["step"] / spe, math.ceil(m["total_steps"] / spe)


def _num(v, fmt):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def postfix(m):
    """loss, lr, images/s, world size, kNN (or linear) top-1 of a report, for the bar and the lines."""
    what, top1 = ("linear top-1", m["lincls_top1"]) if "lincls_top1" in m else ("kNN", m.get(KNN_TOP1))
    return (f"loss {_num(m.get('loss'), '.4f')} lr {_num(m.get('lr'), '.4g')} "
            f"{_num(m.get('images_per_s'), '.1f')} img/s W={m.get('world_size', '-')} "
            f"{what} {'-' if top1 is None else f'{top1:.1f}%'}")


def format_line(m, eta_s):
    done, epochs = epochs_of(m)
    ep = f"{done:.2f}/{epochs}" if epochs else f"{m.get('epoch')}"
    return (f"{PREFIX} epoch {ep} step {m['step']}/{m['total_steps']} {postfix(m)} "
            f"ETA {format_eta(eta_s)}")


def start_line(m, previous_world, max_step):
    """The line for an event="start" report: a fresh start, a restart or a resize."""
    step, world = m.get("step", 0), m.get("world_size")
    if previous_world is None and m.get("resumed_from") is None:
        return (f"{PREFIX} started: world size {world}, global batch {m.get('batch_effective')}, "
                f"{m.get('total_steps')} steps")
    what = "resize" if previous_world not in (None, world) else "restart"
    return (f"{PREFIX} {what}: world size {previous_world} -> {world}, resumed from step {step} "
            f"({m.get('resumed_from') or 'no checkpoint'}), {max(max_step - step, 0)} steps redone")


class RunLog:
    """Appends records to RUN_DIR/metrics.jsonl and prints the start/restart/resize lines.

    print_reports: also print one line per step record (for runs without watch(); with watch() the
    driver prints them, so the default is not to). trackers: moco_ray.trackers.Tracker objects; each
    gets every record, and the start/restart/resize lines, on its own thread (never waited for)."""

    def __init__(self, run_dir, print_reports=False, trackers=()):
        from moco_ray.trackers import TrackerThread

        self.run_dir = storage.at(run_dir)
        self.writer = PartWriter(self.run_dir, METRICS_STEM)
        if self.writer.flush_s:
            self.writer.start_timer()
        self.print_reports = print_reports
        self.world_size = None
        self.max_step = 0
        self.segment_start = None
        self.trackers = [TrackerThread(t) for t in trackers]

    def remember_run(self, run_id):
        """Records the Ray Train run id with this driver's job (moco_ray.reservation)."""
        from moco_ray.reservation import remember

        remember(self.run_dir, run_id, ray.get_runtime_context().get_job_id())

    def record(self, m):
        m = dict(m)
        m.setdefault("time", time.time())
        m.setdefault("checkpoint", None)
        # start, checkpoint and end records are written at once (fit() returns after the end's)
        self.writer.write(m, flush=m["checkpoint"] is not None or m.get(EVENT) in (Event.START, Event.END))
        line = None
        if m.get(EVENT) == Event.START:
            line = start_line(m, self.world_size, self.max_step)
            print(line, flush=True)
            self.world_size = m.get("world_size")
            self.segment_start = (m["time"], m.get("step", 0))
        elif is_step_report(m):
            self.max_step = max(self.max_step, m["step"])
            if self.print_reports:
                print(format_line(m, _eta(self.segment_start, m)), flush=True)
        for tracker in self.trackers:
            tracker.submit(m, line)

    def flush_trackers(self, timeout_s=30.0):
        """Wait (bounded) until the trackers have the records written so far; their counts:
        {tracker: {"dropped", "errors", "queued"}}."""
        for tracker in self.trackers:
            tracker.flush(timeout_s)
        return {t.tracker.name: t.stats() for t in self.trackers}


def start_run_log(run_dir, print_reports=False, trackers=()):
    """A RunLog actor pinned to this (the driver's) node, where RUN_DIR is written and tailed; with
    trackers, it gets the driver's MLFLOW_* and WANDB_* variables (an actor does not inherit them)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from moco_ray.trackers import driver_env

    here = ray.get_runtime_context().get_node_id()
    env = {"runtime_env": {"env_vars": driver_env()}} if trackers and driver_env() else {}
    actor = ray.remote(num_cpus=0, max_restarts=0)(RunLog).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False), **env)
    return actor.remote(str(run_dir), print_reports, list(trackers))


class Publisher:
    """Rank 0's side of the RunLog: send() submits a record and returns at once."""

    MAX_IN_FLIGHT = 64

    def __init__(self, run_log):
        self.run_log = run_log
        self.in_flight = []
        self.dropped = 0

    def send(self, record):
        if self.in_flight:
            _, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)
        if len(self.in_flight) >= self.MAX_IN_FLIGHT:
            self.dropped += 1
            return
        try:
            self.in_flight.append(self.run_log.record.remote(record))
        except Exception:  # a dead actor: metrics are lost, training goes on
            self.dropped += 1

    def drain(self, timeout_s=10.0):
        """Wait (bounded) until the records sent so far are written: before the end report."""
        if self.in_flight:
            ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=timeout_s)
        self.in_flight = []


class ProgressCallback(ray.train.UserCallback):
    """Runs in the Ray Train controller: forwards rank 0's reports that carry a checkpoint to the
    RunLog, with the checkpoint's path (the start and step records come from rank 0 directly)."""

    def __init__(self, run_log, timeout_s=30.0):
        self.run_log = run_log
        self.timeout_s = timeout_s
        self.run_id = None

    def after_report(self, run_context, metrics, checkpoint):
        if run_context.run_id != self.run_id:   # the first report of this run: see reservation.py
            self.run_id = run_context.run_id
            self.run_log.remember_run.remote(run_context.run_id)
        if checkpoint is None or not metrics:
            return
        where = storage.location_of(getattr(checkpoint, "filesystem", None), checkpoint.path)
        m = dict(metrics[0], time=time.time(), checkpoint=str(where))   # a URI on an object store
        try:  # waited for, so that the end record is written when fit() returns
            ray.get(self.run_log.record.remote(m), timeout=self.timeout_s)
        except Exception as e:
            print(f"{PREFIX} run log: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def _eta(segment_start, m):
    """Seconds left at the rate of steps since the last (re)start."""
    if segment_start is None:
        return None
    t0, step0 = segment_start
    done = m["step"] - step0
    if done <= 0:
        return None
    return (m["time"] - t0) / done * (m["total_steps"] - m["step"])


def _columns(file):
    try:
        return os.get_terminal_size(file.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


class LiveView:
    """Shows records: a tqdm bar (tty) or one line per step report (not a tty). Start, restart and
    resize lines come from the RunLog; here a (re)start begins a new bar."""

    def __init__(self, file=None, tty=None):
        self.file = file or sys.stdout
        self.tty = self.file.isatty() if tty is None else tty
        self.bar = None
        self.segment_start = None
        self.last_printed = None
        self.lines = 0

    def feed(self, records):
        for m in records:
            if m.get(EVENT) == Event.START:
                self._close_bar()
                self.segment_start = (m.get("time", time.time()), m.get("step", 0))
                if self.tty and m.get("total_steps"):
                    self._open_bar(m["total_steps"])
            elif is_step_report(m):
                m.setdefault("time", time.time())
                if self.segment_start is None:  # watching a run that was already going
                    self.segment_start = (m["time"], m["step"])
                if self.tty:
                    self._update_bar(m)
                elif (m["step"], postfix(m)) != self.last_printed:  # an epoch-end checkpoint report
                    print(format_line(m, _eta(self.segment_start, m)), file=self.file, flush=True)
                    self.last_printed = (m["step"], postfix(m))     # may repeat the step's report
                    self.lines += 1

    def _open_bar(self, total):
        from tqdm import tqdm

        # Follow the terminal's width; a pty without a size (script, some CI runners) says 0 columns.
        sized = _columns(self.file) > 0
        self.bar = tqdm(total=total, initial=self.segment_start[1], unit="step", file=self.file,
                        dynamic_ncols=sized, ncols=None if sized else 120, nrows=None if sized else 24,
                        miniters=1, mininterval=0,
                        leave=True)

    def _update_bar(self, m):
        if self.bar is None:
            self._open_bar(m["total_steps"])
        done, epochs = epochs_of(m)
        self.bar.total = m["total_steps"]
        self.bar.set_description_str(f"epoch {done:.2f}/{epochs}" if epochs else "epoch ?", refresh=False)
        self.bar.set_postfix_str(postfix(m), refresh=False)
        if m["step"] > self.bar.n:
            self.bar.update(m["step"] - self.bar.n)
        else:
            self.bar.refresh()
        self.lines += 1

    def _close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self):
        self._close_bar()


def watch(run_dir, fit_fn, file=None, tty=None, poll_s=1.0):
    """Call fit_fn() and show the run's progress while it runs; returns what fit_fn returns.

    fit_fn runs in the calling thread (TorchTrainer.fit installs its Ctrl-C handler only in the main
    thread); a daemon thread tails RUN_DIR's metrics parts from their current end (so a --resume shows only
    the new reports), and the records left when fit_fn returns or raises are shown before returning."""
    tail = PartTail(run_dir, METRICS_STEM)
    view = LiveView(file, tty)
    stop = threading.Event()

    def poll():
        while not stop.wait(poll_s):
            try:
                view.feed(tail.read())
            except Exception as e:  # the view must never take the run down
                print(f"{PREFIX} progress view: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=poll, name="moco_ray-progress", daemon=True)
    thread.start()
    try:
        return fit_fn()
    finally:
        stop.set()
        thread.join()
        try:
            view.feed(tail.read())
        finally:
            view.close()
