"""--log-to: the RunLog's records in TensorBoard, MLflow (a real `mlflow server`) and W&B (offline),
each read back with the tracker's own reader; a continued run continues the same tracker run; a
tracker that blocks or raises costs records, never the RunLog's appends.

The RunLog is driven directly (it is a plain class that Ray makes an actor), with records shaped as
the per-worker loop sends them; one CLI run checks the path from --log-to to RUN_DIR/tb/.
"""
import json
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_ports, tiny_run_args
from moco_ray import config as C, trackers
from moco_ray.metrics import BY_KEY, VOCABULARY
from moco_ray.progress import RunLog, read_metrics

CONFIG = C.load("demo").to_dict()
NAMES = {m.name for m in VOCABULARY}


def records(first, last, world, resumed_from=None, end=False, knn=None):
    """A segment as rank 0 and the controller send it: start (with the config), a step record per
    step, the checkpoint record of the last step (with kNN top-1), and the end when `end`."""
    out = [{"event": "start", "world_size": world, "step": first, "epoch": 0, "resumed_from": resumed_from,
            "batch_effective": 64, "total_steps": 100, "config": CONFIG, "knn_top1": math.nan}]
    for step in range(first + 1, last + 1):
        out.append({"event": "step", "step": step, "epoch": 0, "total_steps": 100, "steps_per_epoch": 20,
                    "loss": 6.0 - step / 10, "lr": 0.12, "images_per_s": 100.0 + step, "world_size": world,
                    "restarts": 0 if resumed_from is None else 1, "step_time_s": 0.1, "data_wait_s": 0.01,
                    "knn_top1": math.nan, "images": 32 * step, "accuracy": 0.5})
    ckpt = dict(out[-1], checkpoint=f"/runs/r/checkpoint_{last:06d}", knn_top1=knn if knn is not None else 20.0)
    out.append(dict(ckpt, event="end") if end else ckpt)
    return out


def run_log(run_dir, *tracker_objects):
    return RunLog(run_dir, trackers=tracker_objects)


def feed(log, recs):
    for r in recs:
        log.record(r)
    stats = log.flush_trackers(timeout_s=120)
    assert all(s == {"dropped": 0, "errors": 0, "queued": 0} for s in stats.values()), stats


# ----------------------------------------------------------------------------------------------------
# Choosing trackers
# ----------------------------------------------------------------------------------------------------

def test_log_to_names_and_bad_values_are_one_line_errors(monkeypatch, tmp_path, capsys):
    assert trackers.names(" TensorBoard, mlflow,tensorboard") == ("tensorboard", "mlflow")
    assert trackers.names("") == ()
    with pytest.raises(C.ConfigError, match="unknown tracker 'comet'"):
        C.validate(C.load("demo", ["log_to=tensorboard,comet"]), 2)
    monkeypatch.setattr(trackers.WandbTracker, "module", "wandb_not_installed_here")
    with pytest.raises(C.ConfigError) as e:
        trackers.check("tensorboard,wandb")
    assert str(e.value) == ("--log-to wandb needs the wandb_not_installed_here package: "
                            "pip install moco_ray[wandb]")
    from moco_ray.train import main

    # before Ray starts: the CLI says it in one line and exits 2
    assert main(["--storage-path", str(tmp_path), "--log-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --log-to wandb needs the wandb_not_installed_here package: pip install moco_ray[wandb]"
    assert not (tmp_path / "demo").exists()


def test_yaml_carries_log_to_and_a_continuation_may_change_it(tmp_path):
    from moco_ray import rundir

    path = tmp_path / "run.yaml"
    path.write_text("preset: demo\nlog_to: tensorboard,mlflow\nmlflow_uri: http://127.0.0.1:5000\n")
    cfg = C.load(str(path))
    assert trackers.check(cfg.log_to) == ("tensorboard", "mlflow")
    rundir.record_config(tmp_path / "r", C.load("demo").to_dict())
    rundir.check_config(tmp_path / "r", cfg.to_dict(), set(trackers.KEYS))
    with pytest.raises(C.ConfigError, match="log_to"):
        rundir.check_config(tmp_path / "r", cfg.to_dict())


def test_scalars_are_the_vocabulary_names_of_finite_values():
    values = trackers.scalars(records(0, 1, 2)[1])
    assert set(values) <= NAMES
    assert values["moco_loss"] == pytest.approx(5.9) and "moco_knn_top1_percent" not in values  # NaN
    assert "accuracy" not in values and "moco_step" in values


# ----------------------------------------------------------------------------------------------------
# A slow or failing tracker
# ----------------------------------------------------------------------------------------------------

class Blocking(trackers.Tracker):
    """A tracker whose server hangs: the first record it gets blocks until `release` is set."""
    name = "blocking"

    def __init__(self, run_dir):
        super().__init__(run_dir)
        self.release = threading.Event()
        self.got = []

    def scalars(self, step, values, walltime):
        self.release.wait()
        self.got.append(step)


class Raising(trackers.Tracker):
    name = "raising"

    def scalars(self, step, values, walltime):
        raise ConnectionError("tracker unreachable")


def test_a_blocking_or_raising_tracker_costs_records_never_appends(tmp_path, capsys):
    blocking, raising = Blocking(tmp_path), Raising(tmp_path)
    log = run_log(tmp_path / "run", blocking, raising)
    n = trackers.MAX_QUEUED + 200
    for step in range(1, n + 1):   # would hang here (the test's timeout) if a tracker were waited for
        log.record({"event": "step", "step": step, "total_steps": n, "loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, n + 1))
    assert not blocking.got
    blocked = log.trackers[0]
    assert blocked.dropped >= n - trackers.MAX_QUEUED - 1 > 0   # one record may be in the tracker's hands
    blocking.release.set()
    stats = log.flush_trackers(timeout_s=60)
    assert len(blocking.got) == n - stats["blocking"]["dropped"]
    assert blocking.got == sorted(blocking.got) and blocking.got[0] == 1
    assert stats["raising"]["errors"] + stats["raising"]["dropped"] == n and stats["raising"]["errors"] > 0
    err = capsys.readouterr().err
    assert "tracker blocking is behind: dropping records" in err
    assert err.count("tracker raising: ConnectionError: tracker unreachable") == 1


# ----------------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------------

def tensorboard_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_text_and_hparams_and_a_continuation(tmp_path):
    run_dir = tmp_path / "run"
    feed(run_log(run_dir, trackers.TensorBoardTracker(run_dir)), records(0, 6, 2))
    # the continuation (a new driver: a new RunLog) on 4 workers from step 6's checkpoint
    feed(run_log(run_dir, trackers.TensorBoardTracker(run_dir)),
         records(6, 10, 4, resumed_from="/runs/r/checkpoint_000006", end=True, knn=31.5))
    acc = tensorboard_events(run_dir)
    tags = acc.Tags()
    assert set(tags["scalars"]) <= NAMES and "moco_loss" in tags["scalars"]
    loss = {e.step: e.value for e in acc.Scalars("moco_loss")}
    assert sorted(loss) == list(range(1, 11)) and loss[10] == pytest.approx(5.0)
    assert [(e.step, e.value) for e in acc.Scalars("moco_world_size")][-1] == (10, 4)
    assert [e.value for e in acc.Scalars("moco_knn_top1_percent")] == [20.0, 31.5]
    texts = {tag: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
             for tag in tags["tensors"] if tag.startswith(("events", "checkpoint"))}
    events = next(v for k, v in texts.items() if k.startswith("events"))
    assert events[0].startswith("[moco_ray] started: world size 2")
    assert "resumed from step 6 (/runs/r/checkpoint_000006)" in events[1]
    assert any("checkpoint_000010" in t for k, v in texts.items() if k.startswith("checkpoint") for t in v)
    hparams = acc.summary_metadata.get("_hparams_/session_start_info")
    assert hparams is not None and hparams.plugin_data.plugin_name == "hparams"


# ----------------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on localhost: sqlite backend, a free port."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_ports()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(root / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up: " + (root / "server.log").read_text()[-3000:])
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:   # its job runners may outlive a graceful stop
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_mlflow_one_run_per_run_continued_not_duplicated(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "moco_ray-test")
    run_dir = tmp_path / "pretrain-a"
    feed(run_log(run_dir, trackers.MlflowTracker(run_dir, mlflow_server)), records(0, 6, 2))
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("moco_ray-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "pretrain-a" and run.info.status == "RUNNING"
    assert run.data.params["T"] == str(CONFIG["T"]) and run.data.params["K"] == str(CONFIG["K"])
    assert run.data.tags["moco_ray.checkpoint"] == "/runs/r/checkpoint_000006"

    config = dict(CONFIG, epochs=60)   # the continuation may add epochs (--allow-change epochs)
    more = [dict(r, config=config) if "config" in r else r
            for r in records(6, 10, 4, resumed_from="/runs/r/checkpoint_000006", end=True, knn=31.5)]
    feed(run_log(run_dir, trackers.MlflowTracker(run_dir, mlflow_server)), more)
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.params["epochs"] == str(CONFIG["epochs"])   # params are written once
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "moco_loss")}
    assert sorted(loss) == list(range(1, 11)) and loss[10] == pytest.approx(5.0)
    knn = client.get_metric_history(run.info.run_id, "moco_knn_top1_percent")
    assert sorted(m.value for m in knn) == [20.0, 31.5]
    assert set(again.data.metrics) <= NAMES
    assert "world size None -> 4, resumed from step 6" in again.data.tags["moco_ray.events"]
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run.info.run_id


def test_mlflow_sweep_is_the_parent_of_its_trials(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "moco_ray-sweep-test")
    sweep_dir = tmp_path / "sweep-demo"
    config = dict(CONFIG, log_to="mlflow", mlflow_uri=mlflow_server)
    with trackers.sweep_run(sweep_dir, config):
        for trial in ("trial_a", "trial_b"):   # the trials' drivers: make_trainer's build()
            run_dir = sweep_dir / trial / "train"
            feed(run_log(run_dir, *trackers.build("mlflow", run_dir)), records(0, 3, 1, end=True))
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("moco_ray-sweep-test")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["sweep-demo", "trial_a", "trial_b"]   # a trial's run is named after its trial
    parent = runs["sweep-demo"]
    assert parent.info.status == "FINISHED" and parent.data.params["log_to"] == "mlflow"
    children = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["moco_ray.run_dir"] for r in children) == \
        [str(sweep_dir / "trial_a" / "train"), str(sweep_dir / "trial_b" / "train")]
    assert all(r.info.status == "FINISHED" and r.data.metrics["moco_loss"] == pytest.approx(5.7)
               for r in children)


# ----------------------------------------------------------------------------------------------------
# Weights & Biases, offline
# ----------------------------------------------------------------------------------------------------

def wandb_records(path):
    """The records of a .wandb file, parsed with W&B's own protobuf Record. The file is W&B's
    transaction log: a 7-byte header (":W&B", magic, version), then LevelDB's log format (32 KiB
    blocks of chunks, each with a 7-byte header: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, chunk = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:   # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def wandb_offline_run(path):
    """(run id, history rows, config) of one offline run file."""
    run_id, rows, config = None, [], {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return run_id, rows, config


def test_wandb_offline_needs_no_network_and_a_continuation_resumes_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    feed(run_log(run_dir, trackers.WandbTracker(run_dir)), records(0, 6, 2))
    feed(run_log(run_dir, trackers.WandbTracker(run_dir)),
         records(6, 10, 4, resumed_from="/runs/r/checkpoint_000006", end=True, knn=31.5))
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    for f in files:  # W&B's service process may still be writing the tail of the file
        for _ in range(600):
            if any(r.WhichOneof("record_type") == "exit" for r in wandb_records(f)):
                break
            time.sleep(0.1)
    runs = [wandb_offline_run(f) for f in files]
    run_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    assert [r[0] for r in runs] == [run_id, run_id]   # `wandb sync` appends the second to the first
    loss = {row["moco_step"]: row["moco_loss"] for _, rows, _ in runs for row in rows if "moco_loss" in row}
    assert sorted(loss) == list(range(1, 11)) and loss[10] == pytest.approx(5.0)
    assert {k for _, rows, _ in runs for row in rows for k in row if not k.startswith("_")} <= NAMES
    assert runs[0][2]["T"] == CONFIG["T"] and runs[1][2]["K"] == CONFIG["K"]


# ----------------------------------------------------------------------------------------------------
# The RunLog actor and the CLI
# ----------------------------------------------------------------------------------------------------

def test_the_run_log_actor_gets_the_drivers_tracker_variables(ray_session, tmp_path, monkeypatch):
    """An actor does not inherit the driver's environment (under `ray job submit` the driver is
    not the raylet's parent): start_run_log passes MLFLOW_* and WANDB_* on."""
    from moco_ray.progress import start_run_log

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "passed-on")
    run_dir = tmp_path / "run"
    actor = start_run_log(run_dir, trackers=trackers.build("tensorboard", run_dir))
    assert ray_session.get(actor.__ray_call__.remote(lambda self: os.environ.get("MLFLOW_EXPERIMENT_NAME"))) \
        == "passed-on"
    ray_session.get([actor.record.remote(r) for r in records(0, 3, 2, end=True)])
    stats = ray_session.get(actor.flush_trackers.remote(60))
    assert stats == {"tensorboard": {"dropped": 0, "errors": 0, "queued": 0}}
    # the end record repeats step 3's metrics: one point at step 3, not two
    assert [e.step for e in tensorboard_events(run_dir).Scalars("moco_loss")] == [1, 2, 3]
    ray_session.kill(actor)


@pytest.mark.slow
def test_cli_log_to_tensorboard_writes_the_run_records(ray_session, digits, tmp_path):
    from moco_ray.train import main

    args = tiny_run_args(digits, tmp_path, "tb", "--set", "epochs=1", "--set", "max_steps=6",
                         "--set", "knn_every=0", "--set", "knn_data=", "--log-to", "tensorboard")
    assert main(args) == 0
    written = [m for m in read_metrics(tmp_path / "tb") if m.get("loss") is not None]
    acc = tensorboard_events(tmp_path / "tb")
    loss = {e.step: e.value for e in acc.Scalars(BY_KEY["loss"].name)}
    assert loss == {m["step"]: pytest.approx(m["loss"]) for m in written}
    assert 6 in loss and acc.Scalars("moco_world_size")[-1].value == 2
