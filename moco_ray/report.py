"""python -m moco_ray.report RUN_DIR: the run report, from the metrics a run stored.

RUN_DIR is STORAGE_PATH/NAME of a run (where its checkpoints and metrics.jsonl are), a local path or
a URI (s3://bucket/runs/NAME: moco_ray.storage). Writes RUN_DIR/report/ (or --out; on a URI the
files are made in a local temporary directory and uploaded):
    metrics.parquet   one row per report (rank 0's metrics, the controller's time, the segment)
    loss_lr.png       loss and lr vs step
    knn_top1.png      kNN top-1 vs epoch (the random-init encoder at epoch 0)
    lincls_top1.png   instead of knn_top1.png for a linear evaluation (moco_ray.lincls): top-1 and
                      top-5 vs epoch, the best marked
    throughput.png    images/s vs step, world size overlaid
    data_wait.png     share of the step spent waiting for data vs step
    summary.md        final numbers, the plots, the config
Restarts and resizes are dashed vertical lines; steps redone after a restart are plotted once (the
newest report of each step), while metrics.parquet keeps every report.
"""
import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from moco_ray import plotting, storage
from moco_ray.config import ConfigError
from moco_ray.metrics import EVENT, KNN_INIT_TOP1, KNN_PIXELS_TOP1, KNN_TOP1, Event
from moco_ray.progress import METRICS_FILE, is_step_report, read_metrics

PLOTS = {
    "loss_lr.png": "Loss and learning rate vs step",
    "knn_top1.png": "kNN top-1 vs epoch",
    "throughput.png": "Images/s vs step, world size overlaid",
    "data_wait.png": "Data-wait share vs step",
}
LINCLS_PLOT = ("lincls_top1.png", "Linear top-1 and top-5 vs epoch")


def plots_of(df):
    """The plots of this run: a linear evaluation has its top-1 plot in place of the kNN one."""
    if "lincls_top1" not in df:
        return dict(PLOTS)
    return {LINCLS_PLOT[0] if png == "knn_top1.png" else png: LINCLS_PLOT[1] if png == "knn_top1.png" else title
            for png, title in PLOTS.items()}


class ReportError(Exception):
    """Bad input: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------

def location(path, what="run directory"):
    """The storage.Location of a path or URI; ReportError when no filesystem can be built for it."""
    try:
        return storage.at(path, what)
    except ConfigError as e:
        raise ReportError(str(e)) from None


def load_records(run_dir):
    run_dir = location(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        runs = sorted(name for name, info in run_dir.children()
                      if info.type == storage.pafs.FileType.Directory and (run_dir / name / METRICS_FILE).is_file())
        hint = (f"; runs in it: {', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}" if runs else
                " (expected STORAGE_PATH/NAME of a run)")
        raise ReportError(f"no metrics in {run_dir}: {METRICS_FILE} not found{hint}")
    records = read_metrics(run_dir)
    if not any(is_step_report(m) for m in records):
        raise ReportError(f"no metrics in {run_dir}: {METRICS_FILE} has no step reports yet")
    return records


def find_config(run_dir, records):
    """The run's config: from a start report that carries it, else from the newest checkpoint."""
    for m in reversed(records):
        if isinstance(m.get("config"), dict):
            return m["config"]
    from moco_ray import checkpoint

    for ckpt in checkpoint.in_run(run_dir):
        state = ckpt / checkpoint.STATE
        try:
            import torch

            if state.is_local:   # mmap: only the config's bytes are read
                cfg = torch.load(state.path, map_location="cpu", weights_only=False, mmap=True).get("config")
            else:
                with state.open_input() as f:
                    cfg = torch.load(f, map_location="cpu", weights_only=False).get("config")
            if isinstance(cfg, dict):
                return cfg
        except Exception:  # a partial or corrupt checkpoint: try the previous one
            continue
    return None


def frame(records):
    """One row per report, with its segment (0 = first start, +1 per restart or resize)."""
    import pandas as pd

    rows, segment = [], -1
    for i, m in enumerate(records):
        if m.get(EVENT) == Event.START:
            segment += 1
        row = {k: v for k, v in m.items() if not isinstance(v, (dict, list))}
        row["report"] = i
        row["segment"] = max(segment, 0)
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in df.columns:
        values = df[col].dropna()
        if len(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            df[col] = pd.to_numeric(df[col], errors="coerce")
        elif df[col].dtype == object:
            df[col] = df[col].map(lambda v: None if v is None else str(v))
    return df


def curves(df):
    """Step reports, one per step (the newest report wins after a restart), in step order."""
    steps = df[(df.get(EVENT) != Event.START) & df["step"].notna()]
    return steps.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def world_sizes(df):
    """World size vs step, starts included (a resize shows at the step it resumed from)."""
    w = df[df["step"].notna() & df["world_size"].notna()]
    return w.drop_duplicates("step", keep="last").sort_values("step")[["step", "world_size"]]


def restarts(df):
    """(step, kind, world size) of every restart or resize, in order."""
    out, world = [], None
    for _, m in df[df[EVENT] == Event.START].iterrows():
        w = m.get("world_size")
        if world is not None:
            out.append((m.get("step") or 0, "resize" if w != world else "restart", w))
        world = w
    return out


def start_value(df, key):
    """`key` of the run's first start record (a baseline measured before the first step), or None."""
    starts = df[df[EVENT] == Event.START] if EVENT in df else df.iloc[:0]
    return starts.iloc[0].get(key) if len(starts) and key in df else None


def knn_points(df, knn_every=None):
    """(epoch, kNN top-1): the random-init encoder at 0, then every evaluation at the fractional
    epoch (step / steps_per_epoch) of the report that carries it. The loop evaluates at the end of
    the run ("end" report) and at the epoch ends where epoch % knn_every == 0 ("epoch" report), so
    two evaluations with the same value are two points; step reports repeat the last value. Without
    knn_every (no config found), a changed value marks an evaluation."""
    points = {}
    starts = df[df[EVENT] == Event.START]
    if KNN_INIT_TOP1 in df and len(starts) and _ok(starts.iloc[0].get(KNN_INIT_TOP1)):
        points[0.0] = float(starts.iloc[0][KNN_INIT_TOP1])
    if KNN_TOP1 not in df:
        return sorted(points.items())
    last = None
    for _, m in df[(df[EVENT] != Event.START) & df["step"].notna()].iterrows():
        v, event = m.get(KNN_TOP1), m.get(EVENT)
        if not _ok(v):
            continue
        if knn_every is None:
            fresh = v != last or event == Event.END
        else:
            fresh = event == Event.END or (event == Event.EPOCH and bool(knn_every) and m["epoch"] % knn_every == 0)
        if fresh:
            spe = m.get("steps_per_epoch")
            epoch = m["step"] / spe if _ok(spe) and spe else float(m.get("epoch") or 0)
            points[round(epoch, 3)] = float(v)
        last = v
    return sorted(points.items())


def lincls_points(df, eval_every=None):
    """(epoch, top-1, top-5) of every linear evaluation: at the end of the run and at the epoch ends
    where epoch % eval_every == 0 (without eval_every, a changed value marks one)."""
    if "lincls_top1" not in df:
        return []
    points, last = {}, None
    for _, m in df[df[EVENT].isin([Event.EPOCH, Event.END]) & df["lincls_top1"].notna()].iterrows():
        v, epoch = m["lincls_top1"], int(m["epoch"])
        if eval_every is None:
            fresh = v != last or m[EVENT] == Event.END
        else:
            fresh = m[EVENT] == Event.END or (bool(eval_every) and epoch % eval_every == 0)
        if fresh:
            points[epoch] = (float(v), float(m["lincls_top5"]))
        last = v
    return [(epoch, top1, top5) for epoch, (top1, top5) in sorted(points.items())]


def _ok(v):
    return v is not None and not (isinstance(v, float) and math.isnan(v))


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------

def _mark_restarts(ax, events):
    for i, (step, kind, world) in enumerate(events):
        ax.axvline(step, color="grey", linestyle="--", linewidth=1,
                   label="restart / resize" if i == 0 else None)
        ax.annotate(f"{kind} W={world}", (step, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7, color="grey")


def plot_loss_lr(c, events, path, name):
    fig, ax = plotting.figure(f"{name}: loss and learning rate")
    ax.plot(c["step"], c["loss"], color="tab:blue", marker=".", label="InfoNCE loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(c["step"], c["lr"], color="tab:orange", linestyle="-.", label="lr")
    ax2.set_ylabel("learning rate", color="tab:orange")
    ax2.set_ylim(bottom=0)
    _mark_restarts(ax, events)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    plotting.save(fig, path)


def plot_knn(points, path, name, pixels=None):
    """points: (epoch, top-1) of the encoder; pixels: the raw-pixel kNN top-1 (a dashed line)."""
    fig, ax = plotting.figure(f"{name}: kNN top-1 of the query encoder")
    if _ok(pixels):
        ax.axhline(float(pixels), color="grey", linestyle="--", label=f"raw pixels {float(pixels):.1f}")
        ax.legend(fontsize=8)
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, color="tab:green", marker="o")
        for x, y in points:
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_ylim(0, min(100, max(*ys, float(pixels) if _ok(pixels) else 0) * 1.15 + 1))
    else:
        ax.text(0.5, 0.5, "no kNN measurements in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch (0 = random init)")
    ax.set_ylabel("kNN top-1 (%)")
    plotting.save(fig, path)


def plot_lincls(points, path, name):
    fig, ax = plotting.figure(f"{name}: linear classification on frozen features")
    if points:
        epochs, top1, top5 = zip(*points)
        ax.plot(epochs, top1, color="tab:green", marker="o", label="top-1")
        ax.plot(epochs, top5, color="tab:olive", marker=".", linestyle="--", label="top-5")
        best = max(points, key=lambda p: p[1])
        ax.annotate(f"best {best[1]:.1f}", (best[0], best[1]), textcoords="offset points", xytext=(0, -14),
                    ha="center", fontsize=8)
        ax.set_ylim(0, 100)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    plotting.save(fig, path)


def plot_throughput(c, world, events, path, name):
    fig, ax = plotting.figure(f"{name}: throughput and world size")
    ax.plot(c["step"], c["images_per_s"], color="tab:purple", marker=".",
            label="images/s (global, mean since the (re)start)")
    ax.set_xlabel("step")
    ax.set_ylabel("images/s", color="tab:purple")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.step(world["step"], world["world_size"], where="post", color="black", alpha=0.6, label="world size")
    ax2.set_ylabel("world size (workers)")
    top = int(c["world_size"].max()) if c["world_size"].notna().any() else 1
    ax2.set_ylim(0, top + 1)
    ax2.yaxis.get_major_locator().set_params(integer=True)
    _mark_restarts(ax, events)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    plotting.save(fig, path)


def plot_data_wait(c, events, path, name):
    fig, ax = plotting.figure(f"{name}: share of the step spent waiting for data")
    share = 100 * c["data_wait_share"].clip(0, 1)
    ax.plot(c["step"], share, color="tab:red", marker=".", linestyle="none", alpha=0.6, label="one step")
    if len(c) >= 5:
        ax.plot(c["step"], share.rolling(5, min_periods=1).mean(), color="tab:red", label="mean of 5 reports")
    ax.set_xlabel("step")
    ax.set_ylabel("data wait / step time (%)")
    ax.set_ylim(0, 100)
    _mark_restarts(ax, events)
    ax.legend(loc="upper right", fontsize=8)
    plotting.save(fig, path)


# ----------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------

def _fmt(v, spec=".2f", suffix=""):
    return "n/a" if not _ok(v) else f"{v:{spec}}{suffix}"


def _lincls_row(points, c):
    if not points:
        return ("linear top-1", "n/a")
    best = max(points, key=lambda p: p[1])
    return ("linear top-1", f"{points[-1][1]:.2f} % at epoch {points[-1][0]} (top-5 {points[-1][2]:.2f} %), "
                            f"best {best[1]:.2f} % at epoch {best[0]}")


def summary(name, run_dir, df, c, events, knn, config, lincls=None, plots=PLOTS):
    last = c.iloc[-1]
    done = last.get(EVENT) == Event.END
    total = last.get("total_steps")
    spe = last.get("steps_per_epoch")
    epochs = f"{last['step'] / spe:.2f}" if _ok(spe) and spe else _fmt(last.get("epoch"), "g")
    epochs_total = config.get("epochs") if config else (math.ceil(total / spe) if _ok(spe) and spe else "?")
    wall = df["time"].max() - df["time"].min() if "time" in df and df["time"].notna().any() else None
    worlds = c["world_size"].dropna().astype(int)
    knn_final = knn[-1][1] if knn and knn[-1][0] > 0 else None
    knn_init, knn_pixels = start_value(df, KNN_INIT_TOP1), start_value(df, KNN_PIXELS_TOP1)
    ckpts = df["checkpoint"].dropna() if "checkpoint" in df else []
    n_resize = sum(kind == "resize" for _, kind, _ in events)
    rows = [
        ("status", "finished" if done else f"incomplete: last report at step {int(last['step'])}"),
        ("steps", f"{int(last['step'])} / {_fmt(total, 'g')}"),
        ("epochs", f"{epochs} / {epochs_total}"),
        ("final loss", _fmt(last.get("loss"), ".4f")),
        ("kNN top-1", f"{_fmt(knn_final, '.2f', ' %')} (raw pixels: {_fmt(knn_pixels, '.2f', ' %')}, "
                      f"random init: {_fmt(knn_init, '.2f', ' %')})"),
        ("images/s", f"{_fmt(last.get('images_per_s'), '.1f')} at the end, median "
                     f"{_fmt(c['images_per_s'].median(), '.1f')} over {len(c)} reports"),
        ("data-wait share", f"{_fmt(100 * c['data_wait_share'].mean(), '.1f', ' %')} mean"
         if "data_wait_share" in c else "n/a"),
        ("world size", f"{worlds.iloc[-1]} (min {worlds.min()}, max {worlds.max()})" if len(worlds) else "n/a"),
        ("global batch", _fmt(last.get("batch_effective"), "g")),
        ("restarts / resizes", f"{len(events) - n_resize} / {n_resize}"),
        ("wall time", "n/a" if wall is None else f"{wall:.0f} s (first to last report)"),
        ("reports", str(len(df))),
        ("last checkpoint", f"`{ckpts.iloc[-1]}`" if len(ckpts) else "none"),
    ]
    if lincls is not None:   # a linear evaluation: its accuracy in place of the kNN monitor's
        rows[4] = _lincls_row(lincls, c)
    lines = [f"# Run report: {name}", "",
             f"Run directory `{run_dir}`, report written {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             "## Final numbers", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if events:
        lines += ["", "Restarts and resizes:", ""]
        lines += [f"- {kind} at step {int(step)} -> world size {world}" for step, kind, world in events]
    lines += ["", "## Plots", ""]
    lines += [f"![{title}]({png})" for png, title in plots.items()]
    lines += ["", "## Config", ""]
    if config:
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| `{k}` | `{json.dumps(v) if not isinstance(v, str) else v}` |" for k, v in config.items()]
    else:
        lines += ["Not recorded (no start report with a config and no readable checkpoint)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------

def write_report(run_dir, out=None):
    """Write the report of the run in run_dir (a path or URI); returns the report directory: a Path
    when it is local, else its storage.Location (the files uploaded there). ReportError on bad input."""
    run_dir = location(run_dir)
    records = load_records(run_dir)
    dest = location(out, "--out") if out else run_dir / "report"
    if dest.is_local:
        write_files(run_dir, records, Path(dest.path))
        return Path(dest.path)
    with tempfile.TemporaryDirectory() as tmp:
        write_files(run_dir, records, Path(tmp))
        dest.upload(tmp)
    return dest


def write_files(run_dir, records, out):
    """The report's files in the local directory `out`."""
    out.mkdir(parents=True, exist_ok=True)
    name = run_dir.name
    df = frame(records)
    df.to_parquet(out / "metrics.parquet", index=False)
    config = find_config(run_dir, records)
    c, events, knn = curves(df), restarts(df), knn_points(df, (config or {}).get("knn_every"))
    plot_loss_lr(c, events, out / "loss_lr.png", name)
    plots = plots_of(df)
    lincls = lincls_points(df, (config or {}).get("eval_every")) if LINCLS_PLOT[0] in plots else None
    if lincls is None:
        plot_knn(knn, out / "knn_top1.png", name, start_value(df, KNN_PIXELS_TOP1))
    else:
        plot_lincls(lincls, out / LINCLS_PLOT[0], name)
    plot_throughput(c, world_sizes(df), events, out / "throughput.png", name)
    plot_data_wait(c, events, out / "data_wait.png", name)
    (out / "summary.md").write_text(summary(name, run_dir, df, c, events, knn, config, lincls, plots))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m moco_ray.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="STORAGE_PATH/NAME of a run")
    p.add_argument("--out", default=None, help="report directory (default RUN_DIR/report)")
    args = p.parse_args(argv)
    try:
        out = write_report(args.run_dir, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[moco_ray] report: {out} ({', '.join(storage.at(out).listdir())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
