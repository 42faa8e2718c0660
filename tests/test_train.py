"""End to end on a real local Ray: the driver, TorchTrainer with 2 gloo workers, checkpoints, resume."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_ports, tiny_run_args
from moco_ray import checkpoint, rundir
from moco_ray.progress import read_metrics
from moco_ray.train import main

REPO = Path(__file__).resolve().parents[1]


def steps_of(rows):
    return [r for r in rows if r.get("event") in ("step", "epoch", "end")]


def test_short_demo_lowers_the_loss_and_resumes(ray_session, digits, tmp_path, capsys):
    # The machinery, not evidence of learning: the InfoNCE loss falls and the three kNN numbers are
    # printed (on the plain digits raw pixels win: docs/results.md). K = 2 steps of keys, so the loss
    # starts falling within the first epochs
    K, B, epochs = 128, 64, 5
    # the full-width encoder and the hyperparameters of the digits' demo, whose loss falls within 5 epochs
    short = ("--set", f"K={K}", "--set", "knn_every=5", "--set", "checkpoint_every_steps=30", "--set", "report_every=2",
             "--set", "width=64", "--set", "zero_init_residual=false", "--set", "T=0.2", "--set", "lr=0.12",
             "--set", "crop_min=0.5", "--set", "weight_decay=0.0001")
    assert main(tiny_run_args(digits, tmp_path, "short", "--set", f"epochs={epochs}", *short)) == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "random init" in out and "raw pixels" in out

    rows = read_metrics(tmp_path / "short")
    steps = steps_of(rows)
    per_epoch = len(digits_train_ids(digits)) // B
    n_steps = per_epoch * epochs
    assert steps[-1]["step"] == n_steps and steps[-1]["epoch"] == epochs
    losses = [r["loss"] for r in steps]
    assert all(math.isfinite(x) for x in losses), losses
    # The loss falls: the last epoch's reports against the first epoch's, leaving out the steps
    # before the queue is full of real keys (its random initial keys make those losses low).
    first = [r["loss"] for r in steps if K // B < r["step"] <= per_epoch]
    last = [r["loss"] for r in steps if r["step"] > n_steps - per_epoch]
    assert sum(last) / len(last) < sum(first) / len(first) - 0.2, (first, last)
    assert rows[-1]["knn_top1"] is not None and rows[0]["knn_init_top1"] is not None
    assert rows[0]["knn_pixels_top1"] > 80 and rows[-1]["knn_pixels_top1"] == rows[0]["knn_pixels_top1"]

    final = Path(rows[-1]["checkpoint"])
    manifest = checkpoint.verify(final)
    assert manifest["step"] == n_steps and manifest["world_size"] == 2

    # A corrupt newest checkpoint is skipped: --resume continues from the previous one, and the step
    # and epoch counters go on from there.
    previous = sorted(p for p in (tmp_path / "short").glob("checkpoint_0*") if p.is_dir() and p != final)[-1]
    previous_step = checkpoint.verify(previous)["step"]  # Ray may rotate it out during the resume
    with open(final / checkpoint.queue_file(1), "r+b") as f:
        f.write(b"corrupt!")
    more = ("--set", f"epochs={epochs + 1}", "--allow-change", "epochs")
    assert main(tiny_run_args(digits, tmp_path, "short", "--resume", *more, *short)) == 0
    rows = read_metrics(tmp_path / "short")
    start = [r for r in rows if r.get("event") == "start"][-1]
    assert start["resumed_from"] == str(previous)
    assert start["step"] == previous_step < n_steps
    assert steps_of(rows)[-1]["step"] == n_steps + per_epoch
    assert rundir.recorded_config(tmp_path / "short")["epochs"] == epochs + 1   # the allowed change, recorded


def digits_train_ids(digits):
    from moco_ray.data import dataset_info

    return range(dataset_info(digits["train"])["n"])


def test_existing_run_name_needs_resume(digits, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(tiny_run_args(digits, tmp_path, "taken")) == 2
    assert "--resume" in capsys.readouterr().err


def test_continuing_with_another_config_names_the_keys(digits, tmp_path, capsys):
    from moco_ray import config as C

    rundir.record_config(tmp_path / "run", C.load("demo", ["data=" + str(digits["train"]), "T=0.1"]).to_dict())
    assert main(["--storage-path", str(tmp_path), "--name", "run", "--resume", "auto",
                 "--set", "data=" + str(digits["train"]), "--set", "T=0.3", "--set", "epochs=41"]) == 2
    err = capsys.readouterr().err.strip()
    demo_epochs = C.load("demo", []).epochs
    assert len(err.splitlines()) == 1 and f"epochs {demo_epochs} -> 41" in err and "T 0.1 -> 0.3" in err
    assert "--allow-change T,epochs" in err
    assert main(["--storage-path", str(tmp_path), "--name", "run", "--resume", "auto", "--allow-change",
                 "nonsense"]) == 2
    assert "unknown config key(s) nonsense" in capsys.readouterr().err
    assert main(["--storage-path", str(tmp_path), "--resume", "auto"]) == 2
    assert "--resume auto needs --name" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(ray_session, digits, tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               RAY_USAGE_STATS_ENABLED="0")
    ray = str(Path(sys.executable).parent / "ray")
    # A second cluster beside the session's own: every listener gets its own port. With the
    # defaults both dashboard agents want 52365, the second one loses, and `ray job submit` answers
    # 500 "No available agent".
    base = free_ports(7)
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, client = range(base, base + 7)
    address = f"http://127.0.0.1:{dashboard}"
    # --block keeps the head and its processes in this child's own session: killing that process
    # group stops this cluster only, not the test session's own Ray instance (which `ray stop`
    # would kill too), and at once (a terminated head takes ~30 s to stop its processes).
    head = subprocess.Popen([ray, "start", "--head", "--block", "--port", str(gcs), "--num-cpus", "2",
                             "--dashboard-port", str(dashboard), "--include-dashboard", "true",
                             "--dashboard-agent-listen-port", str(agent),
                             "--dashboard-agent-grpc-port", str(agent_grpc),
                             "--runtime-env-agent-port", str(runtime_env),
                             "--metrics-export-port", str(metrics), "--ray-client-server-port", str(client),
                             "--disable-usage-stats"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # the jobs API answers (what `ray job list` asks, without a CLI process start per try)
        deadline = time.time() + 120
        while not jobs_api_answers(address) and time.time() < deadline:
            time.sleep(0.25)
        args = tiny_run_args(digits, tmp_path, "submitted", "--set", "epochs=1", "--set", "max_steps=4",
                             "--set", "knn_every=0", "--set", "knn_data=")
        job = subprocess.run(
            [ray, "job", "submit", "--address", address, "--working-dir", str(REPO),
             "--submission-id", "moco-test", "--", "python", "-m", "moco_ray.train", *args],
            env=env, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        from ray.job_submission import JobStatus, JobSubmissionClient
        assert JobSubmissionClient(address).get_job_status("moco-test") == JobStatus.SUCCEEDED
        assert "[moco_ray] summary" in job.stdout
        assert (tmp_path / "submitted").is_dir()
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)


def jobs_api_answers(address):
    import urllib.request

    try:
        with urllib.request.urlopen(f"{address}/api/jobs/", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def test_cli_console_is_quiet_and_per_step_records_skip_ray_train_report(digits, tmp_path):
    """The CLI as a user runs it: no Ray Train "Reporting training result ... TrainingReport(...)"
    line per report, and every step's record reaches metrics.jsonl through the RunLog while only
    the start, the checkpoints and the end go through ray.train.report."""
    args = tiny_run_args(digits, tmp_path, "quiet", "--set", "max_steps=12", "--set", "report_every=1",
                         "--set", "checkpoint_every_steps=5", "--set", "knn_every=0", "--set", "knn_data=")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    run = subprocess.run([sys.executable, "-m", "moco_ray.train", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-3000:]
    assert console.count("Reporting training result") == 0 and "TrainingReport(" not in console
    assert "Checkpoint successfully created" not in console  # Ray Train's INFO lines stay in its logs
    assert "[moco_ray] started: world size 2" in console and "[moco_ray] summary" in console
    rows = read_metrics(tmp_path / "quiet")
    assert [r["step"] for r in rows if r.get("event") == "step" and r["checkpoint"] is None] == list(range(1, 13))
    saved = [(r["event"], r["step"]) for r in rows if r["checkpoint"]]
    assert saved == [("step", 5), ("step", 10), ("end", 12)]
    assert rows[0]["event"] == "start" and rows[-1]["event"] == "end"
