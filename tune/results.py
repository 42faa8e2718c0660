"""A sweep's results: the table (printed, and saved as parquet), the best config as YAML, the heatmap,
the metric against m, and each trial's curve over epochs. kNN top-1 is shown next to its baselines:
the same kNN on the randomly initialised encoder and on the raw pixels (each trial measures both
before its first step)."""
import math
import tempfile
from pathlib import Path

from moco_ray import config, plotting, storage
from moco_ray.metrics import EVENT, KNN_INIT_TOP1, KNN_PIXELS_TOP1, KNN_TOP1, Event

RESULTS_FILE = "results.parquet"
BEST_FILE = "best_config.yaml"
HEATMAP_FILE = "heatmap.png"
BY_M_FILE = "by_m.png"
BY_K_FILE = "by_K.png"
CURVES_FILE = "curves.png"
BASELINE = KNN_INIT_TOP1
PIXELS = KNN_PIXELS_TOP1


def _number(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def _curve(df, metric):
    """[(epoch, value)] of one trial's results, one point per epoch (the last, after a restart)."""
    if df is None or metric not in df or "epoch" not in df:
        return []
    points = {}
    for epoch, value in zip(df["epoch"], df[metric]):
        if not (math.isnan(_number(epoch)) or math.isnan(_number(value))):
            points[int(epoch)] = float(value)
    return sorted(points.items())


def baseline(rows, spec, key=BASELINE):
    """The random-init kNN top-1 of the trials (one value: they share the seed and the encoder), or
    with key=PIXELS the raw-pixel kNN top-1; None when the metric is not kNN top-1."""
    values = [r[key] for r in rows if not math.isnan(r.get(key, math.nan))]
    if spec.metric != KNN_TOP1 or not values:
        return None
    return sum(values) / len(values)


def collect(path, spec):
    """One row per trial, from the experiment state Tune stored in `path`."""
    from ray.tune import ExperimentAnalysis

    metric, mode = spec.metric, spec.mode
    path = storage.at(path)
    analysis = ExperimentAnalysis(str(path))
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        df = frames.get(trial.trial_id)
        curve = _curve(df, metric)
        values = [v for _, v in curve]
        best = (max if mode == "max" else min)(values) if values else math.nan
        finished = last.get(EVENT) == Event.END
        rows.append({
            "trial_id": trial.trial_id,
            "tau": float(trial.config["T"]),
            "m": float(trial.config["m"]),
            "K": int(trial.config.get("K", spec.cfg.K)),
            f"{metric}_best": best,
            f"{metric}_last": values[-1] if values else math.nan,
            "epochs": int(last["epoch"]) if last.get("epoch") is not None else 0,
            "stopped_early": trial.status == "TERMINATED" and not finished,
            "status": trial.status,
            "wall_s": _number(last.get("time_total_s")),
            BASELINE: _number(last.get(BASELINE)),
            PIXELS: _number(last.get(PIXELS)),
            "checkpoint": _checkpoint_uri(path, last.get("checkpoint_path")),
            "curve": [list(point) for point in curve],
        })
    rows.sort(key=lambda r: (r["tau"], r["m"], r["K"], r["trial_id"]))
    return rows


def _checkpoint_uri(path, checkpoint):
    """A trial's checkpoint as a user passes it on (--pretrained): Tune reports its path on the
    experiment's filesystem, without the URI's scheme."""
    if not checkpoint or path.is_local:
        return checkpoint or ""
    return str(storage.location_of(path.fs, checkpoint))


def best_row(rows, spec):
    """The best trial by its last value, among the trials that ran to the end (else among all)."""
    key = f"{spec.metric}_last"
    scored = [r for r in rows if not math.isnan(r[key])]
    done = [r for r in scored if r["status"] == "TERMINATED" and not r["stopped_early"]]
    pool = done or scored
    if not pool:
        return None
    sign = 1 if spec.mode == "max" else -1
    return max(pool, key=lambda r: sign * r[key])


def write(path, spec, rows):
    """The table and plots into the sweep's directory, a path or URI (made locally and uploaded)."""
    dest = storage.at(path)
    if dest.is_local:
        return write_files(Path(dest.path), spec, rows)
    with tempfile.TemporaryDirectory() as tmp:
        best = write_files(Path(tmp), spec, rows)
        dest.upload(tmp)
    return best


def write_files(path, spec, rows):
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path / RESULTS_FILE, index=False)
    best = best_row(rows, spec)
    if best is not None:
        cfg = config.apply_overrides(spec.user_cfg, {"T": best["tau"], "m": best["m"], "K": best["K"]})
        config.dump(cfg, path / BEST_FILE)
    heatmap(rows, spec, path / HEATMAP_FILE)
    by_m(rows, spec, path / BY_M_FILE)
    by_K(rows, spec, path / BY_K_FILE)
    curves(rows, spec, path / CURVES_FILE)
    return best


def _cell_label(value, base):
    """A heatmap cell: the value, and its distance from the random-init baseline."""
    return f"{value:.3g}" if base is None else f"{value:.3g}\n({value - base:+.1f})"


def heatmap(rows, spec, out):
    """The metric (each trial's last value, as the best config is chosen) over tau x m: a grid of
    cells for grid-like sweeps (repeats averaged), a scatter for sampled values. The colour scale
    includes the random-init kNN, marked on the colour bar; each cell shows its distance to it."""
    import numpy as np

    metric = spec.metric
    key = f"{metric}_last"
    base, pixels = baseline(rows, spec), baseline(rows, spec, PIXELS)
    taus = sorted({r["tau"] for r in rows})
    ms = sorted({r["m"] for r in rows})
    values = [r[key] for r in rows if not math.isnan(r[key])] + [b for b in (base, pixels) if b is not None]
    scale = dict(vmin=min(values), vmax=max(values)) if values else {}
    fig, ax = plotting.figure(figsize=(1.4 * max(len(taus), 3) + 2, 1.0 * max(len(ms), 3) + 1.5), grid=False)
    cmap = "viridis" if spec.mode == "max" else "viridis_r"
    if len(taus) * len(ms) <= 144:
        grid = np.full((len(ms), len(taus)), np.nan)
        stopped = np.zeros_like(grid, dtype=object)
        for i, m in enumerate(ms):
            for j, t in enumerate(taus):
                cell = [r for r in rows if r["m"] == m and r["tau"] == t]
                vals = [r[key] for r in cell if not math.isnan(r[key])]
                if vals:
                    grid[i, j] = sum(vals) / len(vals)
                if cell and all(r["stopped_early"] for r in cell):
                    stopped[i, j] = f"stopped @ epoch {max(r['epochs'] for r in cell)}"
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, origin="lower", aspect="auto", **scale)
        ax.set_xticks(range(len(taus)), [f"{t:g}" for t in taus])
        ax.set_yticks(range(len(ms)), [f"{m:g}" for m in ms])
        middle = (scale["vmin"] + scale["vmax"]) / 2 if scale else 0
        for (i, j), v in np.ndenumerate(grid):
            if np.isnan(v):
                label, colour = "-", "black"
            else:
                label = _cell_label(v, base) + (f"\n{stopped[i, j]}" if stopped[i, j] else "")
                colour = "black" if (v > middle) == (spec.mode == "max") else "white"
            ax.text(j, i, label, ha="center", va="center", color=colour, fontsize=9)
    else:
        pts = [r for r in rows if not math.isnan(r[key])]
        image = ax.scatter([r["tau"] for r in pts], [r["m"] for r in pts], c=[r[key] for r in pts],
                           cmap=cmap, s=60, edgecolors="black", **scale)
        ax.set_xscale("log")
    bar = fig.colorbar(image, ax=ax, label=metric)
    if base is not None:
        bar.ax.axhline(base, color="red", linewidth=2)
    if pixels is not None:
        bar.ax.axhline(pixels, color="orange", linewidth=2)
    ax.set_xlabel("temperature tau (T)")
    ax.set_ylabel("momentum m")
    ax.set_title(f"{spec.name}: {metric} ({spec.mode}), last value of each trial"
                 + ("" if base is None else f"\nrandom init {base:.4g} (red on the colour bar)")
                 + ("" if pixels is None else f", raw pixels {pixels:.4g} (orange)"), fontsize=9)
    plotting.save(fig, out)


def _baseline_lines(ax, rows, spec):
    base, pixels = baseline(rows, spec), baseline(rows, spec, PIXELS)
    if base is not None:
        ax.axhline(base, color="grey", linestyle="--", label=f"random init {base:.4g}")
    if pixels is not None:
        ax.axhline(pixels, color="grey", linestyle=":", label=f"raw pixels {pixels:.4g}")


def by_m(rows, spec, out):
    """The metric (last value; repeats averaged) against m, one line per tau: the momentum ablation.
    m is placed by rank (0, 0.9, 0.99, ... evenly spaced), since 1 - m spans decades."""
    against(rows, spec, out, "m", "momentum m")


def by_K(rows, spec, out):
    """The metric against the queue size K, one line per tau (K by rank: sizes span powers of 2)."""
    against(rows, spec, out, "K", "queue size K")


def against(rows, spec, out, param, label):
    """The metric (last value; trials that differ in other parameters, and repeats, averaged)
    against `param`, placed by rank, one line per tau."""
    key = f"{spec.metric}_last"
    ms = sorted({r[param] for r in rows})
    fig, ax = plotting.figure(f"{spec.name}: {spec.metric} against {param}",
                              figsize=(1.2 * max(len(ms), 4) + 2, 4), title_size=9)
    for tau in sorted({r["tau"] for r in rows}):
        xs, ys = [], []
        for i, m in enumerate(ms):
            vals = [r[key] for r in rows if r["tau"] == tau and r[param] == m and not math.isnan(r[key])]
            if vals:
                xs.append(i)
                ys.append(sum(vals) / len(vals))
        ax.plot(xs, ys, marker="o", label=f"tau {tau:g}")
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    _baseline_lines(ax, rows, spec)
    ax.set_xticks(range(len(ms)), [f"{m:g}" for m in ms])
    ax.set_xlabel(label)
    ax.set_ylabel(f"{spec.metric} (last)")
    ax.legend(fontsize=8)
    plotting.save(fig, out)


def curves(rows, spec, out):
    """Each trial's metric over epochs; kNN curves start at epoch 0 with the random-init value."""
    base = baseline(rows, spec)
    fig, ax = plotting.figure(f"{spec.name}: {spec.metric} of each trial over epochs", figsize=(7, 4.5),
                              title_size=9)
    for r in rows:
        points = ([[0, r[BASELINE]]] if base is not None and not math.isnan(r[BASELINE]) else []) + list(r["curve"])
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                    label=f"tau {r['tau']:g}, m {r['m']:g}, K {r['K']}" + (" (stopped)" if r["stopped_early"] else ""))
    _baseline_lines(ax, rows, spec)
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.metric)
    ax.legend(fontsize=7, ncol=2)
    plotting.save(fig, out)


def table(rows, spec):
    import pandas as pd

    if not rows:
        return "(no trials)"
    df = pd.DataFrame(rows).drop(columns=["checkpoint", "curve"])
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def summary(path, spec, rows, wall):
    best = best_row(rows, spec)
    head = f"\n[sweep] {spec.name}: {len(rows)} of {spec.trials} trials, wall time {wall:.0f} s"
    lines = [head, table(rows, spec)]
    if best is not None:
        lines.append(f"[sweep] best: T={best['tau']:g} m={best['m']:g} K={best['K']} {spec.metric} "
                     f"{best[spec.metric + '_last']:.4g}  (checkpoint {best['checkpoint'] or 'none'})")
    base, pixels = baseline(rows, spec), baseline(rows, spec, PIXELS)
    if base is not None:
        gain = f"; best trial {best[spec.metric + '_last'] - base:+.2f} points" if best else ""
        lines.append(f"[sweep] random-init kNN top-1 (the encoder before training): {base:.4g}{gain}")
    if pixels is not None:
        gain = f"; best trial {best[spec.metric + '_last'] - pixels:+.2f} points" if best else ""
        lines.append(f"[sweep] raw-pixel kNN top-1 (no encoder): {pixels:.4g}{gain}")
    path = storage.at(path)
    lines.append(f"[sweep] wrote {path / RESULTS_FILE}, {path / BEST_FILE}, {path / HEATMAP_FILE}, "
                 f"{path / BY_M_FILE}, {path / BY_K_FILE}, {path / CURVES_FILE}")
    return "\n".join(lines)
