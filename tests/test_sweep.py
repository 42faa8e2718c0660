"""python -m tune.sweep on a real local Ray: every trial is a real (tiny) MoCo run of moco_ray.train's loop.

The trials train resnet18 (standard stem) at 32px on a 320-image ImageFolder slice of the embedded
digits, batch 32 (10 steps an epoch), one worker each, kNN after every epoch on 100 held-out images.
The test session's Ray has 2 CPUs, so one trial runs at a time (1 worker CPU + the driver's 0.01).
"""
import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from moco_ray import checkpoint, config as C
from moco_ray import train as moco_train
from tune import sweep
from tune.callbacks import FreshMetricCallback
from tune.results import BASELINE, BEST_FILE, BY_K_FILE, BY_M_FILE, CURVES_FILE, HEATMAP_FILE, PIXELS, RESULTS_FILE

REPO = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, VAL_PER_CLASS = 32, 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An ImageFolder slice of the embedded digits: 32 train and 10 val images per class."""
    from PIL import Image

    from data_prep.demo import digit_images, scans

    ink, labels = scans()
    images = digit_images(ink, 32)
    root = tmp_path_factory.mktemp("tiny_digits")
    for split, per_class, offset in (("train", TRAIN_PER_CLASS, 0), ("val", VAL_PER_CLASS, TRAIN_PER_CLASS)):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True)
            idx = [i for i, y in enumerate(labels) if y == c][offset:offset + per_class]
            for i in idx:
                Image.fromarray(images[i]).save(root / split / str(c) / f"{i:04d}.jpg", quality=95)
    return {"train": root / "train", "val": root / "val"}


def sweep_args(tiny, storage, name, *extra):
    # pinned here rather than taken from the demo preset, which changes with the demo
    sets = [f"data={tiny['train']}", f"knn_data={tiny['val']}", "arch=resnet18", "small_stem=false",
            "width=64", "zero_init_residual=false", "weight_decay=0.0001", "crop_min=0.5",
            "res=32", "lr=0.06", "batch_size=32", "K=256", "epochs=2", "knn_every=1", "knn_k=10",
            "report_every=5", "loader_workers=1", "checkpoint_every_steps=100", "keep_checkpoints=1"]
    args = ["--config", "demo", "--storage-path", str(storage), "--name", name, "--workers-per-trial", "1"]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


def wait_for_cpus(ray, n, timeout_s=60):
    """The trials' workers and placement groups are gone: the cluster's CPUs are all free again."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < n and time.monotonic() < deadline:
        time.sleep(1)
    return ray.available_resources().get("CPU", 0)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, and Ray never started
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--tau", "", "--m", "0.9"], "--tau: empty grid"),
    (["--tau", "0.1", "--m", ","], "--m: empty grid"),
    (["--tau", "0.1", "--m", "choice:"], "--m: empty grid"),
    (["--tau", "0.07,0", "--m", "0.9"], "temperature must be > 0"),
    (["--tau", "-0.1", "--m", "0.9"], "temperature must be > 0"),
    (["--tau", "loguniform:0:0.5", "--m", "0.9"], "loguniform needs LO > 0"),
    (["--tau", "0.1", "--m", "0.99,1"], "momentum must be in [0, 1)"),
    (["--tau", "0.1", "--m", "-0.5"], "momentum must be in [0, 1)"),
    (["--tau", "0.1", "--m", "uniform:0.9:1.5"], "momentum must be in [0, 1)"),
    (["--tau", "0.1", "--m", "0.9", "--metric", "top5"], "--metric 'top5' is unknown"),
    (["--tau", "0.1", "--m", "0.9", "--set", "K=16"], "K=16 is smaller than the global batch"),
    (["--tau", "gauss:1", "--m", "0.9"], "unknown distribution"),
    (["--m", "0.9"], "--tau is required"),
    (["--tau", "0.1", "--m", "0.9", "--K", "1024,100.5"], "--K: the queue size must be a whole number"),
    (["--tau", "0.1", "--m", "0.9", "--K", "uniform:256:1024"], "--K: queue sizes are a list"),
    (["--tau", "0.1", "--m", "0.9", "--K", "16,1024"], "K=16 is smaller than the global batch"),
    (["--config", "demo-v3", "--tau", "0.1", "--m", "0.9", "--K", "256,1024"], "--K: MoCo v3 has no queue"),
])
def test_bad_input_is_one_line_before_ray(argv, message, tmp_path, capsys, monkeypatch):
    def no_ray(*a, **k):
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr(sweep, "start_ray", no_ray)
    assert sweep.main(argv + ["--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not any(tmp_path.iterdir())


def test_more_workers_than_this_machine_has_is_refused_before_ray(tmp_path):
    cpus = os.cpu_count()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "tune.sweep", "--tau", "0.1", "--m", "0.9",
                          "--workers-per-trial", str(cpus + 1), "--storage-path", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: --workers-per-trial") and run.stderr.count("\n") == 1, run.stderr
    assert f"{cpus} CPUs" in run.stderr
    assert "Ray instance" not in run.stdout + run.stderr and not any(tmp_path.iterdir())
    assert time.monotonic() - t0 < 60


def test_more_workers_than_the_cluster_holds_is_refused_before_trials(ray_session, tiny, tmp_path, capsys):
    # the session's cluster has 2 CPUs: 2 workers + the trial's driver (0.01 CPU) never fit
    assert sweep.main(sweep_args(tiny, tmp_path, "toobig", "--tau", "0.1", "--m", "0.9",
                                 "--workers-per-trial", "2")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workers-per-trial 2") and "at most 2 CPUs" in err and err.count("\n") == 1
    assert not (tmp_path / "toobig").exists()


def test_search_space_parsing():
    s = sweep.parse_space("--tau", "0.07, 0.2", "grid")
    assert s.kind == "grid" and s.values == (0.07, 0.2) and s.size() == 2
    assert sweep.parse_space("--tau", "0.07,0.2", "random").kind == "choice"
    assert sweep.parse_space("--m", "choice:0.99,0.999,0.9999", "grid").values == (0.99, 0.999, 0.9999)
    log = sweep.parse_space("--tau", "loguniform:0.05:0.5", "grid")
    assert (log.kind, log.lo, log.hi) == ("loguniform", 0.05, 0.5)
    sweep.check_tau(log)
    sweep.check_m(sweep.parse_space("--m", "uniform:0.9:1", "grid"))   # samples [0.9, 1): fine
    from ray.tune.search.sample import Float

    assert isinstance(log.to_tune(), Float)
    assert sweep.parse_space("--tau", "0.1,0.2", "grid").to_tune() == {"grid_search": [0.1, 0.2]}


def test_only_fresh_metric_values_reach_tune(monkeypatch):
    """The loop reports kNN as None before the first kNN and repeats it in later reports; only the
    epoch-end reports that computed it (every knn_every epochs) and the final report go to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    sent = []
    monkeypatch.setattr(TuneReportCallback, "after_report",
                        lambda self, run_context, metrics, checkpoint: sent.append(
                            (metrics[0]["event"], metrics[0]["epoch"], metrics[0]["knn_top1"])))
    cb = object.__new__(FreshMetricCallback)   # no Tune session here: skip TuneReportCallback.__init__
    cb.metric, cb.knn_every, cb.last_epoch = "knn_top1", 2, 0
    for event, epoch, knn in [
        ("start", 0, None),
        ("step", 0, None),
        ("epoch", 0, None),          # end of epoch 1: no kNN (knn_every=2)
        ("step", 1, None),
        ("epoch", 2, 50.0),          # end of epoch 2: kNN
        ("step", 2, 50.0),           # stale
        ("epoch", 2, 50.0),          # end of epoch 3: the stale value, under the epoch index 2
        ("epoch", 4, 60.0),          # end of epoch 4: kNN
        ("epoch", 4, 60.0),          # the same report again after a restart of the workers
        ("end", 5, 61.0),
    ]:
        cb.after_report(None, [{"event": event, "epoch": epoch, "knn_top1": knn}], None)
    assert sent == [("epoch", 2, 50.0), ("epoch", 4, 60.0), ("end", 5, 61.0)]


# ----------------------------------------------------------------------------------------------------
# Real sweeps
# ----------------------------------------------------------------------------------------------------

def read_results(path):
    return pd.read_parquet(path / RESULTS_FILE)


def test_grid_of_four_trials_writes_table_yaml_heatmap(ray_session, tiny, tmp_path, capsys):
    """The real command, starting its own local Ray (two trials at a time here)."""
    from PIL import Image

    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "tune.sweep", *sweep_args(
        tiny, tmp_path, "grid", "--tau", "0.1,0.3", "--m", "0.9,0.99", "--scheduler", "fifo",
        "--set", "epochs=1")], cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    out = run.stdout
    assert run.returncode == 0, (out + run.stderr)[-5000:]
    path = tmp_path / "grid"
    df = read_results(path)
    assert len(df) == 4
    assert set(zip(df.tau, df.m)) == set(itertools.product((0.1, 0.3), (0.9, 0.99)))
    for column in ("tau", "m", "knn_top1_best", "knn_top1_last", "epochs", "stopped_early", "wall_s"):
        assert column in df.columns
    assert (df.status == "TERMINATED").all() and not df.stopped_early.any() and (df.epochs == 1).all()
    assert df.knn_top1_last.between(0, 100).all() and (df.wall_s > 0).all()
    assert "knn_top1_last" in out and "wall time" in out          # the printed table

    # every trial ran moco_ray.train's loop with the base config and its own T and m, and checkpointed
    for row in df.itertuples():
        state, _, _ = checkpoint.load(Path(row.checkpoint), 0, 1, 256)
        assert (state["config"]["T"], state["config"]["m"]) == (row.tau, row.m)
        assert state["config"]["batch_size"] == 32 and state["progress"]["epoch"] == 1

    for name in (HEATMAP_FILE, BY_M_FILE, CURVES_FILE):
        image = Image.open(path / name)
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 200
        assert len(set(image.convert("L").getdata())) > 10          # not a blank canvas
    # the baseline: the same random-init kNN in every trial (same seed and encoder), printed with it
    assert df[BASELINE].between(0, 100).all() and df[BASELINE].nunique() == 1
    assert f"random-init kNN top-1 (the encoder before training): {df[BASELINE].iloc[0]:.4g}" in out
    assert df[PIXELS].between(0, 100).all() and df[PIXELS].nunique() == 1   # no encoder: one value
    assert f"raw-pixel kNN top-1 (no encoder): {df[PIXELS].iloc[0]:.4g}" in out
    for row in df.itertuples():                                     # one kNN point per epoch
        assert [list(p) for p in row.curve] == [[1, row.knn_top1_last]]

    top = df[df.knn_top1_last == df.knn_top1_last.max()]
    cfg = C.load(str(path / BEST_FILE))
    assert (cfg.T, cfg.m) in set(zip(top.tau, top.m)) and cfg.data == str(tiny["train"])
    # the YAML re-runs with moco_ray.train as it is
    assert moco_train.main(["--config", str(path / BEST_FILE), "--num-workers", "1",
                            "--storage-path", str(tmp_path), "--name", "rerun"]) == 0
    assert "kNN top-1" in capsys.readouterr().out
    assert wait_for_cpus(ray_session, 2) == 2


def test_asha_stops_the_bad_setting_early(ray_session, tiny, tmp_path):
    """T=0.2 then T=0.01 (the deliberately bad setting: 7x below the paper's smallest T, so the InfoNCE
    gradients are 1/T = 100x larger). At this size (10 steps an epoch) m=0 has not shown its failure
    yet (its kNN after one epoch is no worse than m=0.99's), T=0.01 wrecks the features in one epoch.
    ASHA (reduction factor 2) compares the second trial's epoch-1 kNN with the first's and stops it."""
    assert sweep.main(sweep_args(tiny, tmp_path, "asha", "--tau", "0.2,0.01", "--m", "0.99",
                                 "--scheduler", "asha", "--max-concurrent", "1")) == 0
    df = read_results(tmp_path / "asha").set_index("tau")
    assert df.stopped_early.any()
    assert df.loc[0.01, "stopped_early"] and df.loc[0.01, "epochs"] == 1
    assert not df.loc[0.2, "stopped_early"] and df.loc[0.2, "epochs"] == 2
    assert df.loc[0.01, "knn_top1_last"] < df.loc[0.2, "knn_top1_best"]
    assert (df.status == "TERMINATED").all()
    # the stopped trial's workers and placement group were released
    assert wait_for_cpus(ray_session, 2) == 2


def _read_until(proc, pattern, timeout_s):
    """Lines of proc's output until one matches; (lines, matched)."""
    lines, found = [], threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                found.set()
                return

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    found.wait(timeout_s)
    return lines, found.is_set()


def test_resume_after_interruption_completes_without_rerunning(ray_session, tiny, tmp_path):
    gcs = ray_session.get_runtime_context().gcs_address
    args = sweep_args(tiny, tmp_path, "resume", "--tau", "0.2,0.3", "--m", "0.99", "--scheduler", "fifo",
                      "--max-concurrent", "1", "--set", "epochs=1", "--address", gcs)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "tune.sweep", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, found = _read_until(proc, r"^\[sweep\] trial \S+ .* finished after", 400)
        assert found, "".join(lines[-50:])
        proc.send_signal(signal.SIGINT)          # Ctrl+C: Tune stops and saves the experiment state
        rest, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == sweep.EXIT_INTERRUPTED, "".join(lines[-30:]) + rest
    assert "--resume" in rest

    path = tmp_path / "resume"
    before = read_results(path)
    done = before[before.status == "TERMINATED"]
    assert len(done) == 1 and "1 of 2 trials" in rest   # the second: pending, or not created yet
    first = path / f"{sweep.trial_dirname(done.trial_id.iloc[0], {'T': done.tau.iloc[0], 'm': done.m.iloc[0]})}"
    first_results = (first / "result.json").read_bytes()
    assert wait_for_cpus(ray_session, 2) == 2

    # --resume auto continues only the same sweep: other arguments are one-line errors naming them
    other = [a if a != "0.2,0.3" else "0.2,0.4" for a in args]
    assert sweep.main([*other, "--resume", "auto"]) == 2
    assert sweep.main(["--resume", "--name", "resume", "--storage-path", str(tmp_path)]) == 0
    after = read_results(path)
    assert len(after) == 2 and (after.status == "TERMINATED").all() and not after.stopped_early.any()
    assert (after.epochs == 1).all() and after.knn_top1_last.notna().all()
    assert set(before.trial_id) < set(after.trial_id)
    # the finished trial was not run again: same Tune results, one start of its training run
    assert (first / "result.json").read_bytes() == first_results
    starts = [json.loads(line) for line in open(first / "train" / "metrics.jsonl")]
    assert sum(r.get("event") == "start" for r in starts) == 1
    assert wait_for_cpus(ray_session, 2) == 2


def test_queue_size_sweep_trains_each_K_and_plots_against_it(ray_session, tiny, tmp_path, capsys):
    """--K sweeps the queue size as --tau and --m sweep theirs: one trial per K, each run with its
    own K (its checkpoint's queue shard has K keys), the K column, the plot against K."""
    from PIL import Image

    assert sweep.main(sweep_args(tiny, tmp_path, "queue", "--tau", "0.2", "--m", "0.99", "--K", "64,256",
                                 "--scheduler", "fifo", "--set", "epochs=1")) == 0
    out = capsys.readouterr().out
    path = tmp_path / "queue"
    df = read_results(path)
    assert sorted(df.K) == [64, 256] and (df.status == "TERMINATED").all() and (df.epochs == 1).all()
    for row in df.itertuples():
        state, shard, _ = checkpoint.load(Path(row.checkpoint), 0, 1, row.K)
        assert state["config"]["K"] == row.K and len(shard["keys"]) == row.K
        assert f"_K={row.K}" in row.checkpoint
    assert "K=" in out.split("[sweep] best:")[1].splitlines()[0]
    image = Image.open(path / BY_K_FILE)
    assert image.format == "PNG" and len(set(image.convert("L").getdata())) > 10
    assert C.load(str(path / BEST_FILE)).K in (64, 256)
    assert wait_for_cpus(ray_session, 2) == 2


# ----------------------------------------------------------------------------------------------------
# The paper's two ablations on glyphs (docs/results.md), each cut to two trials
# ----------------------------------------------------------------------------------------------------

# docs/results.md, seeds 0-2: at K=4096 (a 64-step queue) m=0.99 above m=0 after epoch 10 by
# 2.6-4.2 kNN points; K=256 above K=4096 after epoch 15 by 5.6-19.1 (after epoch 5 both orders
# flip between seeds)
MOMENTUM_EPOCH, MOMENTUM_MARGIN = 10, 1.0
QUEUE_EPOCH, QUEUE_MARGIN = 15, 2.0


def run_ablation(glyphs, storage, name, flags, sets):
    """docs/results.md's ablation command through the CLI with its own local Ray (one worker per
    trial, two at a time, T=0.1), on the default embedded dataset; its results table by trial."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    args = ["--config", "demo", "--tau", "0.1", *flags, "--scheduler", "fifo", "--workers-per-trial", "1",
            "--storage-path", str(storage), "--name", name]
    for s in (f"data={glyphs['train']}", f"knn_data={glyphs['val']}", *sets):
        args += ["--set", s]
    run = subprocess.run([sys.executable, "-m", "tune.sweep", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    return read_results(storage / name)


@pytest.mark.slow
def test_momentum_ablation_m0_ends_below_the_best_m(glyphs, tmp_path):
    """m=0 against m=0.99 (the best m after epoch 10, averaged over the seeds), the m ablation's
    trials at K=4096 (10 epochs of 100 steps); the ordering docs/results.md found on every seed."""
    df = run_ablation(glyphs, tmp_path, "m", ["--m", "0,0.99", "--K", "4096"],
                      [f"epochs={MOMENTUM_EPOCH}", "knn_every=5"]).set_index("m")
    assert (df.epochs == MOMENTUM_EPOCH).all()
    assert df.loc[0.99, "knn_top1_last"] > df.loc[0.0, "knn_top1_last"] + MOMENTUM_MARGIN, df


@pytest.mark.slow
def test_queue_size_ablation_orders_the_smallest_and_largest_K(glyphs, tmp_path):
    """K=256 against K=4096 (m=0.99), each trial the K ablation's (20 epochs) stopped after epoch
    QUEUE_EPOCH; the ordering docs/results.md found at that epoch on every seed it ran."""
    df = run_ablation(glyphs, tmp_path, "K", ["--m", "0.99", "--K", "256,4096"],
                      ["epochs=20", "knn_every=5", f"max_steps={QUEUE_EPOCH * 100}"]).set_index("K")
    assert (df.epochs == QUEUE_EPOCH).all()
    assert df.loc[256, "knn_top1_last"] > df.loc[4096, "knn_top1_last"] + QUEUE_MARGIN, df


def test_spec_round_trips_through_its_json(tiny, tmp_path):
    from moco_ray import storage
    from tune.spec import SweepSpec

    args = sweep.build_parser().parse_args(sweep_args(tiny, tmp_path, "spec", "--tau", "0.1,0.2", "--m",
                                                      "uniform:0.9:0.99", "--K", "256,512"))
    spec = sweep.plan(args)
    assert spec.workers == 1 and spec.K_space.values == (256.0, 512.0) and spec.cfg.data == str(tiny["train"])
    spec = dataclasses.replace(spec, workers=(1, 2), use_gpu=False, started_ms=7)
    spec.save(storage.at(tmp_path))
    assert SweepSpec.load(storage.at(tmp_path)) == spec


def test_v3_sweep_gives_each_trial_its_T_and_m(tiny, tmp_path):
    """The v3 presets sweep T and m like v1/v2: each trial's config is demo-v3's with its own T and m
    (m is v3's base momentum, which its cosine schedule raises to 1)."""
    argv = sweep_args(tiny, tmp_path, "v3", "--tau", "0.2,1.0", "--m", "0.99,0.996", "--set", "warmup_epochs=1",
                      "--set", "m_schedule=cosine")
    argv[argv.index("demo")] = "demo-v3"
    spec = sweep.plan(sweep.build_parser().parse_args(argv))
    assert spec.cfg.method == "v3" and spec.cfg.m_schedule == "cosine" and spec.trials == 4
    trial = sweep.trial_cfg(spec.cfg, {"T": 1.0, "m": 0.996})
    assert (trial.method, trial.T, trial.m) == ("v3", 1.0, 0.996)
    assert dataclasses.replace(trial, T=spec.cfg.T, m=spec.cfg.m) == spec.cfg
