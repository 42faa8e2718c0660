"""The run report (python -m moco_ray.report) and the driver's live progress, both of which read the
metrics.jsonl that the RunLog writes."""
import io
import json
import math
import threading
import time
from pathlib import Path

import pytest

from moco_ray import progress, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    """A valid, non-empty PNG: signature, decodes, sensible size, and not one flat colour."""
    from PIL import Image

    path = Path(path)
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 400 and im.height >= 300
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, f"{path} is blank"


def synthetic_run(run_dir, total=60, spe=20):
    """metrics.jsonl of a run that restarts at step 20 (W=2) and is resized to W=3 at step 40."""
    records, t = [], 1000.0
    for start, end, world, resumed in ((0, 30, 2, None), (20, 45, 2, "ck20"), (40, total, 3, "ck40")):
        records.append({"event": "start", "step": start, "world_size": world, "batch_effective": 128,
                        "total_steps": total, "resumed_from": resumed, "time": t,
                        "knn_init_top1": 10.0 if resumed is None else None,
                        "knn_pixels_top1": 7.0 if resumed is None else None,
                        **({"config": {"T": 0.2, "m": 0.99, "epochs": 3}} if resumed is None else {})})
        for s in range(start + 5, end + 1, 5):
            t += 1.0
            knn = None if s < spe else 20.0 + s // spe * 10
            records.append({"event": "end" if s == total else "step", "step": s, "epoch": s // spe,
                            "steps_per_epoch": spe, "total_steps": total, "loss": 8 - s / total,
                            "lr": 0.03 * math.cos(s / total), "images_per_s": 50.0 * world,
                            "world_size": world, "batch_effective": 128, "data_wait_share": 0.1,
                            "knn_top1": knn, "time": t, "checkpoint": None})
    run_dir.mkdir(parents=True)
    (run_dir / progress.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_report_of_a_run_with_restart_and_resize(tmp_path):
    import pandas as pd

    run = tmp_path / "runs" / "synth"
    records = synthetic_run(run)
    assert report.main([str(run)]) == 0
    out = run / "report"
    df = pd.read_parquet(out / "metrics.parquet")
    assert len(df) == len(records)  # one row per report, redone steps included
    assert list(df["segment"].unique()) == [0, 1, 2]
    for png in report.PLOTS:
        check_png(out / png)
    c = report.curves(df)
    assert list(c["step"]) == list(range(5, 61, 5))  # each step once
    assert [(s, k) for s, k, _ in report.restarts(df)] == [(20, "restart"), (40, "resize")]
    assert report.knn_points(df) == [(0.0, 10.0), (1.0, 30.0), (2.0, 40.0), (3.0, 50.0)]
    summary = (out / "summary.md").read_text()
    assert "| status | finished |" in summary and "| restarts / resizes | 1 / 1 |" in summary
    assert "resize at step 40 -> world size 3" in summary and "| `T` | `0.2` |" in summary
    assert "50.00 % (raw pixels: 7.00 %, random init: 10.00 %)" in summary


def demo_like_run(run_dir, knn):
    """metrics.jsonl of a 30-epoch run with knn_every=10 (2 steps per epoch), restarted in epoch 15
    from the epoch-14 checkpoint. knn: the values of the evaluations at epochs 10, 20, 30."""
    spe, value, records = 2, None, []
    config = {"epochs": 30, "knn_every": 10}
    records.append({"event": "start", "step": 0, "world_size": 2, "knn_init_top1": 9.0, "config": config})
    epochs = list(range(1, 16)) + list(range(15, 31))       # epoch 15 is redone after the restart
    for i, epoch in enumerate(epochs):
        if i == 15:
            records.append({"event": "start", "step": 28, "world_size": 2, "resumed_from": "ck28"})
        for s in (2 * epoch - 1, 2 * epoch):
            records.append({"event": "step", "step": s, "epoch": epoch - 1, "steps_per_epoch": spe,
                            "total_steps": 60, "knn_top1": value, "world_size": 2, "loss": 8 - s / 60,
                            "lr": 0.03, "images_per_s": 100.0, "batch_effective": 64,
                            "data_wait_share": 0.1, "time": 1000.0 + s, "checkpoint": None})
        if epoch % 10 == 0:
            value = knn[epoch // 10 - 1]
        event = "end" if epoch == 30 else "epoch"
        records.append(dict(records[-1], event=event, epoch=epoch, knn_top1=value))
    run_dir.mkdir(parents=True)
    (run_dir / progress.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_knn_plot_has_every_evaluation_even_equal_ones(tmp_path):
    run = tmp_path / "demo"
    demo_like_run(run, knn=[40.0, 55.0, 55.0])
    df = report.frame(progress.read_metrics(run))
    assert report.knn_points(df, knn_every=10) == [(0.0, 9.0), (10.0, 40.0), (20.0, 55.0), (30.0, 55.0)]
    assert report.main([str(run)]) == 0     # knn_every from the start report's config
    assert "55.00 %" in (run / "report" / "summary.md").read_text()
    points = report.knn_points(df, report.find_config(run, progress.read_metrics(run))["knn_every"])
    assert [e for e, _ in points] == [0.0, 10.0, 20.0, 30.0]


@pytest.mark.parametrize("case", ["missing", "empty-dir", "storage-path", "no-step-reports"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    target = tmp_path / "runs"
    if case != "missing":
        target.mkdir()
    if case == "storage-path":
        synthetic_run(target / "a-run")
    if case == "no-step-reports":
        (target / progress.METRICS_FILE).write_text(json.dumps({"event": "start", "step": 0}) + "\n")
    assert report.main([str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert ("does not exist" in err) if case == "missing" else ("no metrics in" in err)
    if case == "storage-path":
        assert "a-run" in err  # names the runs it found


# ----------------------------------------------------------------------------------------------------
# Live progress on the driver
# ----------------------------------------------------------------------------------------------------

def _writer(path, records, delay):
    def fit():
        with open(path, "a") as f:
            for r in records:
                time.sleep(delay)
                f.write(json.dumps(r) + "\n")
                f.flush()
        return "fit-result"
    return fit


def test_watch_prints_one_line_per_report_when_not_a_tty(tmp_path):
    records = synthetic_run(tmp_path / "old")[:8]
    run = tmp_path / "run"
    run.mkdir()
    (run / progress.METRICS_FILE).write_text(json.dumps(dict(records[1], step=59)) + "\n")  # from before
    out = io.StringIO()
    result = progress.watch(run, _writer(run / progress.METRICS_FILE, records, 0.05), file=out, poll_s=0.1)
    assert result == "fit-result"
    lines = out.getvalue().splitlines()
    steps = [r for r in records if progress.is_step_report(r)]
    assert len(lines) == len(steps)  # only the new reports, each once
    first, last = lines[0], lines[-1]
    assert first.startswith("[moco_ray] epoch 0.25/3 step 5/60 loss ")
    assert "100.0 img/s W=2 kNN -" in first and "ETA 11s" in first  # 1 s per 5 steps, 55 steps left
    assert "step 30/60" in last and "kNN 30.0%" in last and "ETA 6s" in last

    # The same step reported twice with the same numbers (a step report, then the epoch-end
    # checkpoint report) is one line; a new kNN value at the same step is a new line.
    view = progress.LiveView(io.StringIO(), tty=False)
    step = dict(records[4], event="step")
    view.feed([records[0], step, dict(step, event="epoch"), dict(step, event="epoch", knn_top1=99.0)])
    assert view.lines == 2


def test_watch_draws_a_bar_on_a_tty_and_survives_fit_errors(tmp_path):
    records = synthetic_run(tmp_path / "old")[:6]
    run = tmp_path / "run"
    out = io.StringIO()

    def fit():
        _writer(run / progress.METRICS_FILE, records, 0.02)()
        raise RuntimeError("worker group failed")

    run.mkdir()
    with pytest.raises(RuntimeError, match="worker group failed"):
        progress.watch(run, fit, file=out, tty=True, poll_s=0.05)
    text = out.getvalue()
    assert "25/60" in text and "step" in text and "loss 7.5833" in text and "W=2" in text
    assert not [t for t in threading.enumerate() if t.name == "moco_ray-progress"]


# ----------------------------------------------------------------------------------------------------
# A short demo run, then its report
# ----------------------------------------------------------------------------------------------------

def test_report_of_a_short_demo_run(ray_session, digits, tmp_path):
    # the digits and the standard stem: the kNN baselines at the start embed a 1437-image bank, not
    # the demo's 5748, at 1/5 of the small stem's cost
    from moco_ray import config as C
    from moco_ray import launch

    cfg = launch.resolve_data(C.load("demo", ["max_steps=6", "batch_size=32", "report_every=2",
                                             "checkpoint_every_steps=1000", f"data={digits['train']}",
                                             f"knn_data={digits['val']}", "small_stem=false",
                                             "metrics_port=0"]))
    name = "report-test"
    run = tmp_path / name
    trainer = launch.make_trainer(cfg, 2, False, tmp_path, name)
    out = io.StringIO()
    result = progress.watch(run, trainer.fit, file=out, poll_s=0.2)
    assert result.metrics["step"] == 6
    assert "step 6/6" in out.getvalue()

    assert report.main([str(run)]) == 0
    for png in report.PLOTS:
        check_png(run / "report" / png)
    import pandas as pd

    df = pd.read_parquet(run / "report" / "metrics.parquet")
    assert len(df) == len(progress.read_metrics(run)) >= 4  # start, steps 2 and 4, end
    assert df["step"].max() == 6 and df["loss"].notna().any()
    summary = (run / "report" / "summary.md").read_text()
    assert "| status | finished |" in summary and "| steps | 6 / 6 |" in summary
    assert "`batch_size` | `32`" in summary  # the config, from the start report or the checkpoint
