"""--log-to and sweeps with a run directory on a URI, against the real S3 endpoint on localhost of
tests/test_storage.py (moto's server): the trackers are fed by a RunLog as the driver feeds them, and
what they left is read back from the bucket through moco_ray.storage, with the trackers' own readers.
Ray-free: the RunLog is a plain class, the sweep's results are written from synthetic trial rows."""
import json
import math

import pytest

import test_sweep
from moco_ray import config as C, storage, trackers
from moco_ray.progress import RunLog, read_metrics
from test_report import check_png
from test_sweep import sweep_args
from test_trackers import CONFIG, NAMES, feed, records, tensorboard_events

# The tiny sweep's data (the moto S3 server's fixtures, s3 and prefix, are conftest's)
tiny = test_sweep.tiny


@pytest.fixture(autouse=True)
def staging(tmp_path, monkeypatch):
    """The trackers' local staging directory of this test."""
    monkeypatch.setenv("MOCO_RAY_STAGING", str(tmp_path / "staging"))
    return tmp_path / "staging"


def run_log(run_dir, *tracker_objects):
    return RunLog(run_dir, trackers=tracker_objects)


def uploaded_tb(run_dir, local):
    """RUN_DIR/tb/ downloaded from the bucket into `local`: its TensorBoard EventAccumulator."""
    (storage.at(run_dir) / "tb").download(local / "tb")
    return tensorboard_events(local)


def test_tensorboard_on_s3_is_staged_and_uploaded_and_a_continuation_adds_to_it(prefix, tmp_path, staging):
    run_dir = f"{prefix}/run"
    feed(run_log(run_dir, trackers.TensorBoardTracker(run_dir)), records(0, 6, 2))
    # the continuation: a new driver, a new staging session, a second event file in RUN_DIR/tb/
    feed(run_log(run_dir, trackers.TensorBoardTracker(run_dir)),
         records(6, 10, 4, resumed_from="/runs/r/checkpoint_000006", end=True, knn=31.5))
    assert len((storage.at(run_dir) / "tb").listdir()) == 2
    acc = uploaded_tb(run_dir, tmp_path / "down")
    assert set(acc.Tags()["scalars"]) <= NAMES
    loss = {e.step: e.value for e in acc.Scalars("moco_loss")}
    assert sorted(loss) == list(range(1, 11)) and loss[10] == pytest.approx(5.0)
    assert [e.value for e in acc.Scalars("moco_knn_top1_percent")] == [20.0, 31.5]
    assert acc.summary_metadata.get("_hparams_/session_start_info") is not None
    # staged on this node, one session per tracker, under a directory named after the run
    (session_dir,) = staging.iterdir()
    assert session_dir.name.startswith("run-") and len(list(session_dir.iterdir())) == 2
    assert sorted({r["step"] for r in read_metrics(run_dir)}) == list(range(0, 11))   # the RunLog's own record


def test_tensorboard_uploads_at_its_cadence_and_rolls_over_big_event_files(prefix, tmp_path, monkeypatch):
    run_dir = f"{prefix}/run"
    tb = storage.at(run_dir) / "tb"
    monkeypatch.setattr(trackers, "UPLOAD_EVERY_S", math.inf)   # no copy but the finish's and the flush's
    tracker = trackers.TensorBoardTracker(run_dir)
    for r in records(0, 6, 2):
        tracker.handle(r)
    assert not tb.exists()
    tracker.sync()   # what the driver's flush_trackers does on the tracker's thread
    assert len(tb.listdir()) == 1

    monkeypatch.setattr(trackers, "UPLOAD_EVERY_S", 0.0)   # a copy at every record
    monkeypatch.setattr(trackers, "ROLL_BYTES", 1)         # and a new event file at every record
    tracker.handle(records(6, 7, 2)[1])
    assert len(tb.listdir()) == 2
    loss = {e.step: e.value for e in uploaded_tb(run_dir, tmp_path / "down").Scalars("moco_loss")}
    assert sorted(loss) == list(range(1, 8))


def test_a_failing_upload_costs_records_never_appends_and_a_later_sync_catches_up(s3, tmp_path):
    admin, bucket = buckets(), "moco-gone"
    admin.create_dir(bucket)
    run_dir = f"s3://{bucket}/run"
    log = run_log(tmp_path / "local-run", trackers.TensorBoardTracker(run_dir))   # the RunLog's own record
    admin.delete_dir(bucket)   # the store goes away (nothing was uploaded yet: the bucket is empty)
    recs = records(0, 6, 2, end=True)
    for r in recs:
        log.record(r)
    stats = log.flush_trackers(timeout_s=60)["tensorboard"]
    assert stats["errors"] >= 1 and stats["dropped"] == 0
    assert len(read_metrics(tmp_path / "local-run")) == len(recs)
    admin.create_dir(bucket)   # the store is back: the driver's flush copies what was missed
    assert log.flush_trackers(timeout_s=60)["tensorboard"]["errors"] == stats["errors"]
    loss = {e.step: e.value for e in uploaded_tb(run_dir, tmp_path / "down").Scalars("moco_loss")}
    assert sorted(loss) == list(range(1, 7))


def buckets():
    """An S3 filesystem on the test's endpoint that may create and delete buckets."""
    import os

    import pyarrow.fs as pafs

    endpoint = os.environ["AWS_ENDPOINT_URL_S3"].removeprefix("http://")
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True,
                             allow_bucket_deletion=True)


def test_mlflow_with_a_run_directory_on_s3_resumes_the_same_run(prefix, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "moco_ray-s3")
    run_dir = f"{prefix}/pretrain-s3"
    (tracker,) = trackers.build("mlflow", run_dir, tracking)
    feed(run_log(run_dir, tracker), records(0, 6, 2))
    state = json.loads((storage.at(run_dir) / "mlflow_run.json").read_text())
    # the continuation: another driver (nothing local is shared but the tracking server)
    (again,) = trackers.build("mlflow", run_dir, tracking)
    feed(run_log(run_dir, again), records(6, 10, 4, resumed_from="/runs/r/checkpoint_000006", end=True))
    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("moco_ray-s3").experiment_id])
    assert run.info.run_id == state["run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "pretrain-s3" and run.data.tags["moco_ray.run_dir"] == run_dir
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "moco_loss")) == list(range(1, 11))
    assert run.data.params["K"] == str(CONFIG["K"])


def test_mlflow_on_s3_without_a_tracking_uri_is_one_line_before_ray(prefix, monkeypatch, capsys):
    from moco_ray.train import build_parser, main
    from moco_ray import launch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--storage-path", prefix, "--log-to", "tensorboard,mlflow"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --log-to mlflow with storage path {prefix}: MLflow's default store (an sqlite file in the "
        f"storage path) must be local; set MLFLOW_TRACKING_URI or --set mlflow_uri=URI")
    assert not storage.at(prefix).exists()
    run = launch.plan(build_parser().parse_args(["--storage-path", prefix, "--log-to", "tensorboard,mlflow",
                                                 "--set", "mlflow_uri=http://127.0.0.1:5000"]))
    assert run.cfg.log_to == "tensorboard,mlflow" and not run.storage_path.is_local
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert launch.plan(build_parser().parse_args(["--storage-path", prefix, "--log-to", "mlflow"])).cfg.log_to


def test_wandb_offline_on_s3_uploads_its_run_files_and_resumes_by_the_stored_id(prefix, tmp_path, monkeypatch):
    from test_trackers import wandb_offline_run, wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = f"{prefix}/run"
    feed(run_log(run_dir, trackers.WandbTracker(run_dir)), records(0, 6, 2, end=True))
    feed(run_log(run_dir, trackers.WandbTracker(run_dir)),
         records(6, 10, 4, resumed_from="/runs/r/checkpoint_000006", end=True))
    run_id = json.loads((storage.at(run_dir) / "wandb_run.json").read_text())["id"]
    (storage.at(run_dir) / "wandb").download(tmp_path / "down")
    # one folder per session: W&B names its own by the second it started, which two sessions can share
    files = sorted((tmp_path / "down").glob("*/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and files[0].parent.parent != files[1].parent.parent, files
    assert all(any(r.WhichOneof("record_type") == "run" for r in wandb_records(f)) for f in files)
    assert [wandb_offline_run(f)[0] for f in files] == [run_id, run_id]


# ----------------------------------------------------------------------------------------------------
# A sweep on a URI (the parts before and after Ray Tune)
# ----------------------------------------------------------------------------------------------------

def trial_rows():
    """Four finished trials as tune.results.collect returns them."""
    rows = []
    for i, (tau, m) in enumerate([(0.1, 0.99), (0.1, 0.999), (0.2, 0.99), (0.2, 0.999)]):
        curve = [[1, 20.0 + i], [2, 30.0 + 2 * i]]
        rows.append({"trial_id": f"t{i}", "tau": tau, "m": m, "K": 256, "knn_top1_best": curve[-1][1],
                     "knn_top1_last": curve[-1][1], "epochs": 2, "stopped_early": False, "status": "TERMINATED",
                     "wall_s": 10.0, "knn_init_top1": 12.0, "knn_pixels_top1": 15.0, "checkpoint": "",
                     "curve": curve})
    return rows


def sweep_argv(tiny, storage_path, *extra):
    """tests/test_sweep.py's tiny sweep, with no --name."""
    args = sweep_args(tiny, storage_path, "unused", "--tau", "0.1,0.2", "--m", "0.99,0.999", *extra)
    i = args.index("--name")
    return args[:i] + args[i + 2:]


def test_sweep_spec_and_results_on_s3(prefix, tiny, tmp_path, monkeypatch):
    import pandas as pd

    from tune import results, sweep
    from tune.spec import SweepSpec

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(C.ConfigError, match="MLflow's default store"):
        sweep.plan(sweep.build_parser().parse_args(sweep_argv(tiny, prefix, "--set", "log_to=mlflow")))
    spec = sweep.plan(sweep.build_parser().parse_args(sweep_argv(tiny, prefix, "--name", "sw")))
    path = storage.at(spec.experiment_path)
    assert spec.experiment_path == f"{prefix}/sw" and not path.is_local
    spec.save(path)
    assert SweepSpec.load(path) == spec and (path / "sweep.json").is_file()
    # --resume alone finds the newest sweep on the bucket by its sweep.json
    resume = sweep.build_parser().parse_args(sweep_argv(tiny, prefix, "--resume"))
    assert sweep._sweep_name(resume, storage.at(prefix)) == "sw"

    rows = trial_rows()
    best = results.write(path, spec, rows)
    names = set(path.listdir())
    assert {results.RESULTS_FILE, results.BEST_FILE, results.HEATMAP_FILE, results.CURVES_FILE} <= names
    path.download(tmp_path / "down")
    df = pd.read_parquet(tmp_path / "down" / results.RESULTS_FILE)
    assert list(df.trial_id) == ["t0", "t1", "t2", "t3"]
    assert C.load(str(tmp_path / "down" / results.BEST_FILE)).T == pytest.approx(0.2)
    for png in (results.HEATMAP_FILE, results.CURVES_FILE):
        check_png(tmp_path / "down" / png)
    assert best["trial_id"] == "t3"
    assert f"{path / results.RESULTS_FILE}" in results.summary(path, spec, rows, 1.0)
    # Tune reports a checkpoint by its path on the filesystem: the table names it by its URI
    checkpoint = path / "trial_t3" / "train" / "checkpoint_000000022"
    assert results._checkpoint_uri(path, checkpoint.path) == str(checkpoint)
