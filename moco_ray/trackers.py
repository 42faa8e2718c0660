"""The run's records in the trackers people already use: TensorBoard, MLflow, Weights & Biases.

    python -m moco_ray.train --log-to tensorboard,mlflow,wandb     # any subset; or `log_to:` in YAML

Only the driver's RunLog (moco_ray.progress) talks to a tracker: it hands every record it writes to
metrics.jsonl (start with the config, step records, kNN and linear top-1, checkpoints, restarts and
resizes, the end) to a TrackerThread per tracker. A thread owns its tracker and a queue of at most
MAX_QUEUED records; when the tracker falls behind, new records are dropped and counted, and a tracker
that raises loses that record (counted, the first error printed). So a slow, failing or unreachable
tracker costs records, never steps: the workers never see it, and the RunLog never waits for it.
Memory: MAX_QUEUED records of ~1 KB per tracker.

Scalars are named after moco_ray.metrics.VOCABULARY (the Prometheus family names, moco_loss,
moco_knn_top1_percent, ...), so a metric has one name in Grafana, TensorBoard, MLflow and W&B.
A continued run (--resume) continues the same tracker run: TensorBoard appends to RUN_DIR/tb/, MLflow
and W&B find their run id in RUN_DIR (mlflow_run.json, wandb_run.json, read and written through
moco_ray.storage).

A run directory on a URI (s3://...): the tracker libraries write local files, so TensorBoard and W&B
write theirs in a Staging directory on the driver's node (where the RunLog runs) and it copies them
to the same place under RUN_DIR, from the tracker's thread (see Staging for when and what it costs).
MLflow's default store, an sqlite file in the storage path, cannot be on a URI: such a run needs
$MLFLOW_TRACKING_URI or mlflow_uri (a one-line ConfigError before Ray starts otherwise).
"""
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import queue
import sys
import threading
import time
import uuid
from pathlib import Path

from moco_ray import storage
from moco_ray.config import ConfigError
from moco_ray.metrics import BY_KEY, EVENT, KNN_TOP1, Event

PREFIX = "[moco_ray]"
MAX_QUEUED = 1024
# Where results go is not part of the run: a continuation may change these without --allow-change.
KEYS = ("log_to", "mlflow_uri")
# The environment of the driver that the trackers read (the RunLog actor does not inherit it).
ENV_PREFIXES = ("MLFLOW_", "WANDB_")
# A run directory on a URI: staged files are copied at most this often (and at a finish and the
# driver's flush), and TensorBoard starts a new event file past ROLL_BYTES, the most one copy PUTs.
UPLOAD_EVERY_S = 30.0
ROLL_BYTES = 4 << 20


def names(log_to):
    """'tensorboard,mlflow' -> ('tensorboard', 'mlflow'); ConfigError naming an unknown tracker."""
    chosen = tuple(dict.fromkeys(n.strip().lower() for n in str(log_to or "").split(",") if n.strip()))
    unknown = [n for n in chosen if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"log_to: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")
    return chosen


def check(log_to):
    """The trackers of `log_to`, each with its library installed; else a one-line ConfigError naming
    the extra to install. Imports nothing (find_spec only), so it costs nothing before Ray starts."""
    chosen = names(log_to)
    for name in chosen:
        if importlib.util.find_spec(TRACKERS[name].module) is None:
            raise ConfigError(f"--log-to {name} needs the {TRACKERS[name].module} package: "
                              f"pip install moco_ray[{name}]")
    return chosen


def check_storage(log_to, mlflow_uri, storage_path):
    """Before Ray starts: ConfigError (one line) when mlflow is chosen with no tracking URI on a
    storage path where its default sqlite file cannot be (a URI)."""
    if "mlflow" in names(log_to):
        mlflow_uri_of(mlflow_uri, storage_path)


def build(log_to, run_dir, mlflow_uri=""):
    """The Tracker objects for a run (no I/O: they open on their thread, inside the RunLog). run_dir:
    a local path, a URI or a storage.Location."""
    run_dir = storage.at(run_dir)
    made = []
    for name in check(log_to):
        if name == "mlflow":
            # A sweep's trial (STORAGE/SWEEP/TRIAL/train) is a child of the sweep's run, on its server
            parent = _read_json(run_dir.parent.parent / MlflowTracker.STATE)
            uri = parent.get("tracking_uri") or mlflow_uri_of(mlflow_uri, run_dir.parent)
            made.append(MlflowTracker(run_dir, uri, parent.get("run_id")))
        else:
            made.append(TRACKERS[name](run_dir))
    return made


def mlflow_uri_of(mlflow_uri, storage_path):
    """The config's mlflow_uri, else $MLFLOW_TRACKING_URI, else an sqlite file in the storage path
    when it is local (ConfigError on a URI: sqlite needs a local file)."""
    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    storage_path = storage.at(storage_path)
    if not storage_path.is_local:
        raise ConfigError(f"--log-to mlflow with storage path {storage_path}: MLflow's default store (an sqlite "
                          f"file in the storage path) must be local; set MLFLOW_TRACKING_URI or --set mlflow_uri=URI")
    return f"sqlite:///{Path(storage_path.path) / 'mlflow.db'}"


@contextlib.contextmanager
def sweep_run(sweep_dir, config):
    """With mlflow in config["log_to"]: the sweep's own MLflow run (its config as params) while the
    trials run, the parent of the trials' runs, which find it in SWEEP_DIR/mlflow_run.json. A
    tracker error is a warning: the sweep goes on."""
    if "mlflow" not in names(config.get("log_to")):
        yield
        return
    sweep_dir = storage.at(sweep_dir)
    parent = MlflowTracker(sweep_dir, mlflow_uri_of(config.get("mlflow_uri"), sweep_dir.parent))
    if _quietly(parent.open, "opening the sweep's run"):
        _quietly(lambda: parent.params(flat_params(config)), "the sweep's params")
    failed = True
    try:
        yield
        failed = False
    finally:
        if getattr(parent, "run_id", None):
            _quietly(lambda: parent.finish(failed), "closing the sweep's run")


def _quietly(fn, what):
    try:
        fn()
        return True
    except Exception as e:
        _warn(f"mlflow: {what}: {type(e).__name__}: {e}")
        return False


def driver_env():
    """The MLFLOW_* and WANDB_* variables of this process, for the RunLog actor's runtime_env."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def scalars(record):
    """The record's finite metric values, by their VOCABULARY names."""
    return {BY_KEY[k].name: float(v) for k, v in record.items()
            if k in BY_KEY and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(config):
    """A config as tracker hyperparameters: scalars as they are, anything else as its string."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def _read_json(path):
    """A tracker's state file (a path or Location); {} when there is none."""
    try:
        return json.loads(storage.at(path).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_json(path, doc):
    storage.at(path).write_text(json.dumps(doc))   # atomic: a local temporary file renamed, or one PUT


def staging_root():
    """Where trackers stage their files for run directories on a URI: $MOCO_RAY_STAGING, else
    ~/.cache/moco_ray/trackers (on the driver's node)."""
    return Path(os.environ.get("MOCO_RAY_STAGING") or Path.home() / ".cache" / "moco_ray" / "trackers")


class Staging:
    """The local directory a tracker library writes its files in, and their copy in the run directory.

    A local run directory is its own staging: nothing to copy. For a run directory on a URI the files
    are written under staging_root()/NAME-HASH/SESSION/ (HASH: of the run's URI; SESSION: this
    tracker's, so files another driver left there are never uploaded into this run) and copied to the
    same relative paths under RUN_DIR by sync(): each file whose size or mtime changed since its last
    copy, whole, one PUT each. A growing file is so uploaded again at each sync: the TensorBoard
    tracker rolls over to a new event file at ROLL_BYTES to bound that; W&B syncs only at its finish.
    A failed copy raises (the tracker's thread counts it); the next sync retries what it missed.
    per_session=DIR copies DIR/X to DIR/SESSION/X instead, for a library that names its files by
    something two sessions can share (W&B: the second it started and the run id, the same for a
    resume that starts within the second the previous session did). Memory: one file at a time."""

    def __init__(self, run_dir, per_session=None):
        run_dir = storage.at(run_dir)
        self.remote = None if run_dir.is_local else run_dir
        self.per_session = per_session
        if self.remote is None:
            self.local = Path(run_dir.path)
        else:
            key = hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]
            self.session = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            self.local = staging_root() / f"{run_dir.name}-{key}" / self.session
        self.local.mkdir(parents=True, exist_ok=True)
        self.sent = {}                 # relative path -> (size, mtime_ns) of its last copy
        self.last = time.monotonic()   # of the last sync (or the start): the first copy is every_s after it

    def sync(self, every_s=0.0):
        """Copy what changed to RUN_DIR, unless the last sync was less than every_s ago; the number
        of files copied."""
        if self.remote is None or time.monotonic() - self.last < every_s:
            return 0
        self.last = time.monotonic()
        copied = 0
        for path in sorted(self.local.rglob("*")):
            if path.is_symlink() or not path.is_file():   # W&B links latest-run to its run directory
                continue
            stat = path.stat()
            rel, stamp = path.relative_to(self.local).as_posix(), (stat.st_size, stat.st_mtime_ns)
            if self.sent.get(rel) != stamp:
                (self.remote / self._remote_path(rel)).write_bytes(path.read_bytes())
                self.sent[rel] = stamp
                copied += 1
        return copied

    def _remote_path(self, rel):
        top, _, rest = rel.partition("/")
        return f"{top}/{self.session}/{rest}" if rest and top == self.per_session else rel


# ----------------------------------------------------------------------------------------------------
# The trackers
# ----------------------------------------------------------------------------------------------------

class Tracker:
    """One destination. handle() turns a RunLog record into calls of the hooks below, which each
    tracker implements; they run on the tracker's own thread only."""

    name = ""     # the --log-to name, which is also the pip extra
    module = ""   # the library it needs

    def __init__(self, run_dir):
        self.run_dir = storage.at(run_dir)
        self.opened = False
        self.staging = None   # a Staging, for a tracker that writes files
        self.logged_step, self.step_values = None, {}   # the values already logged at logged_step

    def sync(self):
        """Copy the staged files to a run directory on a URI now (the tracker's thread only)."""
        if self.staging is not None:
            self.staging.sync()

    # hooks
    def open(self):
        """Start the tracker run, or continue the one this run directory recorded."""

    def params(self, config):
        """The run's config as hyperparameters (every start record carries it)."""

    def scalars(self, step, values, walltime):
        """values: {VOCABULARY name: float} at optimizer step `step`."""

    def text(self, step, tag, text):
        """An event: a start, restart or resize line (tag "events"), a checkpoint's path."""

    def flush(self):
        """Make what was logged visible (called after each record)."""

    def finish(self, failed):
        """The run ended (or failed): close the tracker run; a later record opens it again."""

    # dispatch
    def handle(self, record, line=None):
        if not self.opened:
            self.open()
            self.opened = True
        step = int(record.get("step") or 0)
        if record.get("config"):
            self.params(flat_params(record["config"]))
        values = self.unlogged(step, scalars(record))
        if values:
            self.scalars(step, values, record.get("time") or time.time())
        if line:
            self.text(step, "events", line)
        if record.get("checkpoint"):
            self.text(step, "checkpoint", str(record["checkpoint"]))
        if record.get(EVENT) in (Event.END, Event.FAILED):
            self.finish(failed=record[EVENT] == Event.FAILED)
            self.opened = False
            self.sync()
        else:
            self.flush()

    def unlogged(self, step, values):
        """The values not yet logged at this step. A checkpoint or end record repeats its step's
        record (adding kNN); logging the repeat again would add a second point per metric at that
        step wherever its timestamp differs (MLflow keeps both, TensorBoard both events)."""
        if step != self.logged_step:
            self.logged_step, self.step_values = step, {}
        new = {k: v for k, v in values.items() if self.step_values.get(k) != v}
        self.step_values.update(new)
        return new


class TensorBoardTracker(Tracker):
    """Event files under RUN_DIR/tb/ (a continuation adds a file there; TensorBoard reads them all).
    On a URI: staged, copied every UPLOAD_EVERY_S, a new event file past ROLL_BYTES."""

    name, module = "tensorboard", "tensorboard"

    def open(self):
        self.staging = self.staging or Staging(self.run_dir)
        self._new_writer()

    def _new_writer(self):
        from torch.utils.tensorboard import SummaryWriter

        tb = self.staging.local / "tb"
        before = set(tb.glob("events.*"))
        self.writer = SummaryWriter(log_dir=str(tb))
        self.event_file = max(set(tb.glob("events.*")) - before, default=None)

    def params(self, config):
        from torch.utils.tensorboard.summary import hparams

        # The HParams tab, in this run's own event files (SummaryWriter.add_hparams opens a new run)
        for summary in hparams(config, {BY_KEY[KNN_TOP1].name: math.nan}):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, step, values, walltime):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step, walltime=walltime)

    def text(self, step, tag, text):
        self.writer.add_text(tag, text, step)

    def flush(self):
        self.writer.flush()
        if self.staging.remote is None:
            return
        if self.event_file is not None and self.event_file.stat().st_size >= ROLL_BYTES:
            self.writer.close()   # its last copy is the next sync's; then it never changes again
            self._new_writer()
        self.staging.sync(UPLOAD_EVERY_S)

    def finish(self, failed):
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run per moco_ray run (its id in RUN_DIR/mlflow_run.json), in the experiment
    $MLFLOW_EXPERIMENT_NAME (default moco_ray); a continuation sets the same run RUNNING again.
    A sweep's trials are child runs of the sweep's run (sweep_run)."""

    name, module = "mlflow", "mlflow"
    STATE = "mlflow_run.json"

    def __init__(self, run_dir, tracking_uri, parent_run_id=None):
        super().__init__(run_dir)
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id

    def open(self):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        state = _read_json(self.run_dir / self.STATE)
        if state.get("tracking_uri") == self.tracking_uri and state.get("run_id"):
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "moco_ray")
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            tags = {"moco_ray.run_dir": str(self.run_dir)}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            name = self.run_dir.parent.name if self.parent_run_id else self.run_dir.name   # TRIAL/train
            self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            _write_json(self.run_dir / self.STATE, {"tracking_uri": self.tracking_uri, "run_id": self.run_id})
        # MLflow refuses to change a logged param: a continuation (--allow-change epochs) keeps the first
        self.logged = set(self.client.get_run(self.run_id).data.params)

    def params(self, config):
        from mlflow.entities import Param

        new = [Param(k, str(v)) for k, v in config.items() if k not in self.logged]
        for i in range(0, len(new), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        self.logged.update(p.key for p in new)

    def scalars(self, step, values, walltime):
        from mlflow.entities import Metric

        ms = int(walltime * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def text(self, step, tag, text):
        self.client.set_tag(self.run_id, f"moco_ray.{tag}", text)

    def finish(self, failed):
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker(Tracker):
    """A W&B run with the id in RUN_DIR/wandb_run.json, resumed by that id; files under RUN_DIR/wandb/
    (on a URI: staged, copied to RUN_DIR/wandb/SESSION/ at the run's finish and the driver's flush).
    WANDB_MODE=offline needs no network (`wandb sync RUN_DIR/wandb/offline-run-*`, on a URI
    RUN_DIR/wandb/*/offline-run-* once downloaded, uploads later);
    project $WANDB_PROJECT (default moco_ray). Charts use moco_step as their x axis, so the steps a
    restart redoes are logged again instead of being refused as going back."""

    name, module = "wandb", "wandb"
    STATE = "wandb_run.json"

    def open(self):
        import wandb

        state = _read_json(self.run_dir / self.STATE)
        run_id = state.get("id") or uuid.uuid4().hex[:12]
        if not state.get("id"):
            _write_json(self.run_dir / self.STATE, {"id": run_id})
        self.staging = self.staging or Staging(self.run_dir, per_session="wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "moco_ray"), id=run_id, resume="allow",
                              name=self.run_dir.name, dir=str(self.staging.local), reinit="finish_previous",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                      x_save_requirements=False, save_code=False))
        self.run.define_metric("moco_step")
        self.run.define_metric("*", step_metric="moco_step")

    def params(self, config):
        self.run.config.update(config, allow_val_change=True)

    def scalars(self, step, values, walltime):
        self.run.log(dict(values, moco_step=step))

    def text(self, step, tag, text):
        self.run.summary[f"moco_ray/{tag}"] = text

    def finish(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


TRACKERS = {t.name: t for t in (TensorBoardTracker, MlflowTracker, WandbTracker)}


# ----------------------------------------------------------------------------------------------------
# The fan-out
# ----------------------------------------------------------------------------------------------------

class TrackerThread:
    """One tracker fed from a bounded queue by a daemon thread: submit() never waits."""

    def __init__(self, tracker, max_queued=MAX_QUEUED):
        self.tracker = tracker
        self.queue = queue.Queue(max_queued)
        self.dropped = 0
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name=f"moco_ray-{tracker.name}", daemon=True)
        self.thread.start()

    def submit(self, record, line=None):
        try:
            self.queue.put_nowait((record, line))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                _warn(f"{self.tracker.name} is behind: dropping records (queue of {self.queue.maxsize})")

    def _run(self):
        while True:
            record, line = self.queue.get()
            if isinstance(record, threading.Event):   # flush(): everything before it is delivered and copied
                # a failed copy costs the records not copied yet; the next sync retries them
                self._guarded(self.tracker.sync, "copying its files: ")
                record.set()
                continue
            self._guarded(lambda: self.tracker.handle(record, line), after=" (records are lost, training goes on)")

    def _guarded(self, call, before="", after=""):
        """call(); a tracker must never take the run log down: an exception is counted, the first one warned."""
        try:
            call()
        except Exception as e:
            self.errors += 1
            if self.errors == 1:
                _warn(f"{self.tracker.name}: {before}{type(e).__name__}: {e}{after}")

    def flush(self, timeout_s):
        """Wait (at most timeout_s) until the records submitted so far are delivered; True if they are."""
        done = threading.Event()
        try:
            self.queue.put((done, None), timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def stats(self):
        return {"dropped": self.dropped, "errors": self.errors, "queued": self.queue.qsize()}


def _warn(text):
    print(f"{PREFIX} tracker {text}", file=sys.stderr, flush=True)
