"""A sweep's results: the table (printed, and saved as parquet), the best config as YAML, the heatmap."""
import math
from pathlib import Path

from moco_ray import config as C

RESULTS_FILE = "results.parquet"
BEST_FILE = "best_config.yaml"
HEATMAP_FILE = "heatmap.png"


def _number(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def collect(path, spec):
    """One row per trial, from the experiment state Tune stored in `path`."""
    from ray.tune import ExperimentAnalysis

    metric, mode = spec["metric"], spec["mode"]
    analysis = ExperimentAnalysis(str(path))
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        df = frames.get(trial.trial_id)
        values = []
        if df is not None and metric in df:
            values = [v for v in (_number(x) for x in df[metric]) if not math.isnan(v)]
        best = (max if mode == "max" else min)(values) if values else math.nan
        finished = last.get("event") == "end"
        rows.append({
            "trial_id": trial.trial_id,
            "tau": float(trial.config["T"]),
            "m": float(trial.config["m"]),
            f"{metric}_best": best,
            f"{metric}_last": values[-1] if values else math.nan,
            "epochs": int(last["epoch"]) if last.get("epoch") is not None else 0,
            "stopped_early": trial.status == "TERMINATED" and not finished,
            "status": trial.status,
            "wall_s": _number(last.get("time_total_s")),
            "checkpoint": last.get("checkpoint_path") or "",
        })
    rows.sort(key=lambda r: (r["tau"], r["m"], r["trial_id"]))
    return rows


def best_row(rows, spec):
    """The best trial by its last value, among the trials that ran to the end (else among all)."""
    key = f"{spec['metric']}_last"
    scored = [r for r in rows if not math.isnan(r[key])]
    done = [r for r in scored if r["status"] == "TERMINATED" and not r["stopped_early"]]
    pool = done or scored
    if not pool:
        return None
    sign = 1 if spec["mode"] == "max" else -1
    return max(pool, key=lambda r: sign * r[key])


def write(path, spec, rows):
    import pandas as pd

    path = Path(path)
    pd.DataFrame(rows).to_parquet(path / RESULTS_FILE, index=False)
    best = best_row(rows, spec)
    if best is not None:
        cfg = C.apply_overrides(C.apply_overrides(C.Config(), spec["user_cfg"]), {"T": best["tau"], "m": best["m"]})
        C.dump(cfg, path / BEST_FILE)
    heatmap(rows, spec, path / HEATMAP_FILE)
    return best


def heatmap(rows, spec, out):
    """The metric (each trial's last value, as the best config is chosen) over tau x m: a grid of cells for grid-like sweeps (repeats
    averaged), a scatter for sampled values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = spec["metric"]
    key = f"{metric}_last"
    taus = sorted({r["tau"] for r in rows})
    ms = sorted({r["m"] for r in rows})
    fig, ax = plt.subplots(figsize=(1.4 * max(len(taus), 3) + 2, 1.0 * max(len(ms), 3) + 1.5), dpi=110)
    cmap = "viridis" if spec["mode"] == "max" else "viridis_r"
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
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, origin="lower", aspect="auto")
        ax.set_xticks(range(len(taus)), [f"{t:g}" for t in taus])
        ax.set_yticks(range(len(ms)), [f"{m:g}" for m in ms])
        finite = grid[np.isfinite(grid)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0
        for i in range(len(ms)):
            for j in range(len(taus)):
                if np.isnan(grid[i, j]):
                    label, colour = "-", "black"
                else:
                    label = f"{grid[i, j]:.3g}" + (f"\n{stopped[i, j]}" if stopped[i, j] else "")
                    bright = (grid[i, j] > middle) == (spec["mode"] == "max")
                    colour = "black" if bright else "white"
                ax.text(j, i, label, ha="center", va="center", color=colour, fontsize=9)
    else:
        pts = [r for r in rows if not math.isnan(r[key])]
        image = ax.scatter([r["tau"] for r in pts], [r["m"] for r in pts], c=[r[key] for r in pts],
                           cmap=cmap, s=60, edgecolors="black")
        ax.set_xscale("log")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_xlabel("temperature tau (T)")
    ax.set_ylabel("momentum m")
    ax.set_title(f"{spec['name']}: {metric} ({spec['mode']}), last value of each trial")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def table(rows, spec):
    import pandas as pd

    if not rows:
        return "(no trials)"
    df = pd.DataFrame(rows).drop(columns=["checkpoint"])
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def summary(path, spec, rows, wall):
    best = best_row(rows, spec)
    lines = [f"\n[sweep] {spec['name']}: {len(rows)} of {spec.get('trials', len(rows))} trials, wall time {wall:.0f} s", table(rows, spec)]
    if best is not None:
        lines.append(f"[sweep] best: T={best['tau']:g} m={best['m']:g} {spec['metric']} "
                     f"{best[spec['metric'] + '_last']:.4g}  (checkpoint {best['checkpoint'] or 'none'})")
    path = Path(path)
    lines.append(f"[sweep] wrote {path / RESULTS_FILE}, {path / BEST_FILE}, {path / HEATMAP_FILE}")
    return "\n".join(lines)
