"""python -m tune.sweep: Ray Tune sweeps of the MoCo temperature tau (T) and key-encoder momentum m.

    python -m tune.sweep --config demo --tau 0.1,0.2 --m 0.99      # two make-demo runs, one T each
    python -m tune.sweep --config moco-v2 --tau loguniform:0.05:0.5 --m choice:0.99,0.999,0.9999 \\
        --search random --num-samples 12 --workers-per-trial 4 --address auto --storage-path /mnt/runs
    python -m tune.sweep --name NAME --storage-path DIR --resume        # continue an interrupted sweep
    python -m tune.sweep --resume auto --name NAME --tau .. --m ..      # continue it if it exists, else start it
    python -m tune.sweep --tau 0.2 --m 0.99 --K 256,1024,4096            # the queue size K too

A value list `a,b,c` is a grid (`--search grid`, the default) or a choice (`--search random`);
`choice:a,b`, `grid:a,b`, `uniform:LO:HI` and `loguniform:LO:HI` name the distribution explicitly.
Every trial is one Ray Train run of the same per-worker loop as `python -m moco_ray.train`: a Tune
function trainable is the trial's driver and builds the TorchTrainer with `moco_ray.launch.make_trainer`,
with the base config's T and m (and K with --K) replaced. Rank 0's reports that carry a fresh value of the metric reach
Tune (kNN top-1 after each kNN epoch, see `knn_every`), so ASHA can stop bad trials; the trial's
checkpoints are the run's own. Each trial's run lives in STORAGE/NAME/<trial dir>/train (metrics.jsonl,
checkpoints; `python -m moco_ray.report` reads it).

Results in STORAGE/NAME: results.parquet (one row per trial), best_config.yaml (accepted by
`python -m moco_ray.train --config`), heatmap.png (the metric over tau x m), by_m.png and by_K.png
(the metric against m and against K), curves.png.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from moco_ray import config, launch, rundir, storage
from moco_ray.launch import start_ray
from moco_ray.metrics import KNN_TOP1
from tune.spec import SPEC_FILE, Space, SweepSpec

# Metrics a sweep can optimise: rank 0's report keys, and whether higher is better.
METRICS = {KNN_TOP1: "max", "loss": "min", "accuracy": "max"}
TRIAL_CPU = 0.01        # the trial's driver (the Tune function trainable) only waits on its TorchTrainer
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------------------------------
# The search space
# ----------------------------------------------------------------------------------------------------

def _floats(flag, text):
    items = [v.strip() for v in text.split(",")]
    if not any(items):
        raise config.ConfigError(f"{flag}: empty grid; give values like 0.07,0.2 or a distribution")
    if not all(items):
        raise config.ConfigError(f"{flag}: empty value in {text!r}")
    try:
        values = tuple(float(v) for v in items)
    except ValueError:
        raise config.ConfigError(f"{flag}: expected numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise config.ConfigError(f"{flag}: values must be finite, got {text!r}")
    return values


def parse_space(flag, text, search):
    """'a,b,c' (grid, or choice with --search random), 'grid:a,b', 'choice:a,b', 'uniform:LO:HI',
    'loguniform:LO:HI'."""
    text = (text or "").strip()
    kind, sep, rest = text.partition(":")
    if not sep:
        return Space("grid" if search == "grid" else "choice", _floats(flag, text))
    kind = kind.strip().lower()
    if kind in ("grid", "choice"):
        return Space(kind, _floats(flag, rest))
    if kind in ("uniform", "loguniform"):
        bounds = rest.split(":")
        if len(bounds) != 2:
            raise config.ConfigError(f"{flag}: {kind} expects {kind}:LO:HI, got {text!r}")
        lo, hi = _floats(flag, ",".join(bounds))
        if not lo < hi:
            raise config.ConfigError(f"{flag}: {kind}:{lo:g}:{hi:g} needs LO < HI")
        if kind == "loguniform" and lo <= 0:
            raise config.ConfigError(f"{flag}: loguniform needs LO > 0, got {lo:g}")
        return Space(kind, lo=lo, hi=hi)
    raise config.ConfigError(f"{flag}: unknown distribution {kind!r}; use a list a,b,c or one of "
                        f"grid:, choice:, uniform:LO:HI, loguniform:LO:HI")


def check_tau(space):
    bad = [v for v in space.points() if not v > 0]
    if bad:
        raise config.ConfigError(f"--tau: the temperature must be > 0, got {bad[0]:g}")


def check_K(space):
    """Queue sizes: a list of whole numbers >= 1 (grid or choice; no ranges)."""
    if space.kind not in ("grid", "choice"):
        raise config.ConfigError(f"--K: queue sizes are a list (a,b or choice:a,b), not {space.kind}")
    bad = [v for v in space.values if not (v >= 1 and float(v).is_integer())]
    if bad:
        raise config.ConfigError(f"--K: the queue size must be a whole number >= 1, got {bad[0]:g}")


def check_m(space):
    ranged = space.kind in ("uniform", "loguniform")
    for v in space.points():
        # a range's upper end is never drawn (Tune samples [LO, HI)), so m in [LO, 1) allows HI = 1
        if not (0 <= v < 1 or (ranged and v == space.hi and v <= 1)):
            raise config.ConfigError(f"--m: the momentum must be in [0, 1), got {v:g}")


# ----------------------------------------------------------------------------------------------------
# The trial: a Tune function trainable that is the driver of one Ray Train run
# ----------------------------------------------------------------------------------------------------

def trial_dirname(trial_id, sampled):
    queue = f"_K={int(sampled['K'])}" if "K" in sampled else ""
    return f"trial_{trial_id}_T={float(sampled['T']):g}_m={float(sampled['m']):g}{queue}"


def _trial_dirname_creator(trial):
    return trial_dirname(trial.trial_id, trial.config)


def trial_cfg(base, sampled):
    """The trial's config: the sweep's base config (a Config) with T and m (and K, when swept)
    replaced by the trial's `sampled` values."""
    swept = {"T": float(sampled["T"]), "m": float(sampled["m"])}
    if "K" in sampled:
        swept["K"] = int(sampled["K"])
    return config.apply_overrides(base, swept)


def trial_driver(sampled, spec):
    """Runs in the trial's Tune actor (sampled: the trial's T, m and K, Tune's config); builds and runs
    the same TorchTrainer as moco_ray.train."""
    import ray.tune

    from tune.callbacks import FreshMetricCallback

    cfg = trial_cfg(spec.cfg, sampled)
    config.validate(cfg, launch.max_workers(spec.workers))
    trial_dir = storage.at(spec.experiment_path) / trial_dirname(ray.tune.get_context().get_trial_id(), sampled)
    # Same storage path and name when Tuner.restore restarts the trial: Ray Train then resumes the run
    # from its latest checkpoint.
    trainer = launch.make_trainer(
        cfg, spec.workers, spec.use_gpu, trial_dir, "train", max_failures=spec.max_failures,
        callbacks=[FreshMetricCallback(spec.metric, cfg.knn_every)])
    trainer.fit()


def make_trainable(spec):
    from ray import tune

    resources = {"CPU": TRIAL_CPU}
    return tune.with_resources(tune.with_parameters(trial_driver, spec=spec), resources)


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(prog="python -m tune.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    launch.add_run_arguments(p, config.PRESETS, what="sweep")
    p.add_argument("--tau", default=None, help="temperatures T: 0.07,0.2 | choice:.. | loguniform:LO:HI")
    p.add_argument("--m", default=None, help="momenta m: 0.99,0.999 | choice:.. | uniform:LO:HI")
    p.add_argument("--K", default=None, help="queue sizes K: 1024,4096 | choice:.. (default: the config's K)")
    p.add_argument("--search", choices=("grid", "random"), default="grid",
                   help="value lists are a grid (every combination) or a random choice")
    p.add_argument("--num-samples", type=int, default=None,
                   help="grid: repeats of the grid (default 1); random: trials (default 10)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--grace-period", type=int, default=None,
                   help="ASHA: epochs before a trial can be stopped (default: the first kNN epoch)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/this at each rung")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the cluster holds)")
    p.add_argument("--workers-per-trial", default="2",
                   help="Ray Train workers per trial: N or MIN:MAX (default 2, as moco_ray.train)")
    p.add_argument("--metric", default=KNN_TOP1, help=f"what to optimise: {', '.join(METRICS)}")
    return p


def _sweep_name(args, storage_path):
    """--name; with --resume alone the newest sweep (the newest sweep.json); else sweep-CONFIG-TIMESTAMP."""
    stem = args.config if args.config in config.PRESETS else Path(args.config).stem
    name, _ = rundir.resolve(storage_path, args.name, args.resume, f"sweep-{stem}-{time.strftime('%Y%m%d-%H%M%S')}",
                             what="sweep", marker=SPEC_FILE)
    return name


def plan(args):
    """Everything that can be checked before Ray starts. Returns the sweep spec; ConfigError if bad."""
    storage_path = storage.at(args.storage_path)   # a path or URI; ConfigError without a filesystem
    name = _sweep_name(args, storage_path)
    path = storage_path / name
    if args.resume == "auto":
        fresh = plan(argparse.Namespace(**{**vars(args), "resume": None, "name": None}))
        return _continue_or_start(path, replace(fresh, name=name, experiment_path=str(path)))
    if args.resume:
        given = [f for f, v in (("--tau", args.tau), ("--m", args.m), ("--K", args.K), ("--set", args.set)) if v]
        if given:
            raise config.ConfigError(f"--resume continues the stored sweep {name!r}; {', '.join(given)} cannot change")
        spec = SweepSpec.load(path)
        from ray.tune import Tuner

        if spec is None or not Tuner.can_restore(str(path)):
            raise config.ConfigError(f"--resume: {path} holds no restorable sweep")
        return replace(spec, resume=True)

    for flag, value in (("--tau", args.tau), ("--m", args.m)):
        if value is None:
            raise config.ConfigError(f"{flag} is required, e.g. --tau 0.07,0.2 --m 0.99,0.999")
    tau = parse_space("--tau", args.tau, args.search)
    m = parse_space("--m", args.m, args.search)
    queue = parse_space("--K", args.K, args.search) if args.K is not None else None
    check_tau(tau)
    check_m(m)
    if queue is not None:
        check_K(queue)
    if args.metric not in METRICS:
        raise config.ConfigError(f"--metric {args.metric!r} is unknown; choose one of {', '.join(METRICS)}")
    if args.num_samples is not None and args.num_samples < 1:
        raise config.ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise config.ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.max_failures < 0:
        raise config.ConfigError(f"--max-failures must be >= 0, got {args.max_failures}")
    if not args.reduction_factor > 1:
        raise config.ConfigError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    workers = launch.parse_workers(args.workers_per_trial)
    cfg = config.load(args.config, args.set)
    config.validate(cfg, launch.max_workers(workers))
    if queue is not None and cfg.method == "v3":
        raise config.ConfigError("--K: MoCo v3 has no queue (its negatives are the global batch's keys); sweep "
                                 "--tau and --m")
    from moco_ray import trackers

    trackers.check_storage(cfg.log_to, cfg.mlflow_uri, storage_path)
    for t in tau.points():
        for mm in m.points():
            for k in (queue.points() if queue else [cfg.K]):
                if mm < 1:
                    config.validate(trial_cfg(cfg, {"T": t, "m": mm, "K": k}), launch.max_workers(workers))
    if args.grace_period is not None and not 1 <= args.grace_period <= cfg.epochs:
        raise config.ConfigError(f"--grace-period must be in [1, epochs={cfg.epochs}], got {args.grace_period}")
    if args.address is None and not _ray_running():
        need = launch.max_workers(workers)
        cpus = os.cpu_count() or 1
        if args.use_gpu != "true" and need > cpus:
            raise config.ConfigError(f"--workers-per-trial {args.workers_per_trial}: a trial needs {need} CPU "
                                f"workers, this machine has {cpus} CPUs")
    resolved = launch.resolve_data(cfg)
    if args.metric == KNN_TOP1 and not resolved.knn_data:
        raise config.ConfigError("--metric knn_top1 needs a labelled held-out split: --set knn_data=DIR")
    num_samples = args.num_samples or (1 if args.search == "grid" else 10)
    trials = num_samples * tau.size() * m.size() * (queue.size() if queue else 1)
    return SweepSpec(
        name=name, storage_path=str(storage_path), experiment_path=str(path), config=args.config,
        set=tuple(args.set), cfg=resolved, user_cfg=cfg, tau=args.tau, m=args.m, K=args.K,
        tau_space=tau, m_space=m, K_space=queue, search=args.search, num_samples=num_samples, trials=trials,
        scheduler=args.scheduler, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        max_concurrent=args.max_concurrent, workers=workers, max_failures=args.max_failures,
        metric=args.metric, mode=METRICS[args.metric], use_gpu_flag=args.use_gpu)


# What a continuation (--resume auto) must share with the sweep it continues.
SAME_SWEEP = ("config", "set", "tau", "m", "K", "search", "num_samples", "scheduler", "grace_period",
              "reduction_factor", "workers", "metric")


def _continue_or_start(path, fresh):
    """--resume auto: the stored sweep at `path` if Tune can restore it (the arguments must be the
    ones it started with), else `fresh`, started there."""
    from ray.tune import Tuner

    if not ((path / SPEC_FILE).is_file() and Tuner.can_restore(str(path))):
        return fresh
    stored = SweepSpec.load(path)
    differ = [k for k in SAME_SWEEP if rundir.plain(getattr(stored, k)) != rundir.plain(getattr(fresh, k))]
    if differ:
        raise config.ConfigError(f"--resume auto: sweep {path.name!r} was started with other arguments: "
                            + ", ".join(f"{k} {getattr(stored, k)!r} -> {getattr(fresh, k)!r}" for k in differ))
    return replace(stored, resume=True)


def _ray_running():
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


def capacity(spec, total):
    """How many trials the cluster holds at once (0: not even one). `total`: the cluster's maximum
    resources."""
    w = launch.max_workers(spec.workers)
    cpu = total.get("CPU", 0)
    if spec.use_gpu:
        fits = [int(total.get("GPU", 0) // w), int(cpu // TRIAL_CPU + 1e-9)]
    else:
        fits = [int(cpu / (w + TRIAL_CPU) + 1e-9)]
    return min(fits)


def max_cluster_resources():
    """The most the cluster can ever have: the autoscaler's limits when it has any (as Ray Train's own
    check), else what it has now."""
    import ray

    total = dict(ray.cluster_resources())
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:   # private API: fall back to the resources the cluster has now
        limits = {}
    for key, value in limits.items():
        total[key] = max(total.get(key, 0), value)
    return total


def check_cluster(spec):
    """After connecting, before launching trials: does one trial fit the cluster at all? Returns the
    spec with its GPU choice made (--use-gpu auto: whether the cluster has GPUs; a resumed sweep
    keeps its own) and how many trials fit at once."""
    total = max_cluster_resources()
    if spec.use_gpu is None:
        flag = spec.use_gpu_flag
        spec = replace(spec, use_gpu=total.get("GPU", 0) > 0 if flag == "auto" else flag == "true")
    fits = capacity(spec, total)
    if fits < 1:
        w = launch.max_workers(spec.workers)
        need = f"{w} GPUs" if spec.use_gpu else f"{w + TRIAL_CPU:g} CPUs ({w} workers + the trial driver)"
        have = f"{total.get('GPU', 0):g} GPUs" if spec.use_gpu else f"{total.get('CPU', 0):g} CPUs"
        raise config.ConfigError(f"--workers-per-trial {w}: a trial needs {need}, the cluster has at most {have}")
    return spec, fits


def scheduler_for(spec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler == "fifo":
        return FIFOScheduler()
    cfg = spec.cfg
    grace = spec.grace_period
    if grace is None:
        knn_every = cfg.knn_every if spec.metric == KNN_TOP1 else 1
        grace = min(knn_every or cfg.epochs, cfg.epochs)
    # time in epochs: the reports that reach Tune carry the number of completed epochs
    return ASHAScheduler(time_attr="epoch", max_t=cfg.epochs, grace_period=grace,
                         reduction_factor=spec.reduction_factor)


def build_tuner(spec, max_concurrent):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from tune.callbacks import SweepProgress
    from tune.cleanup import ReleaseOrphanedPlacementGroups

    trainable = make_trainable(spec)
    if spec.resume:
        return tune.Tuner.restore(spec.experiment_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    param_space = {"T": spec.tau_space.to_tune(), "m": spec.m_space.to_tune()}
    if spec.K_space:
        param_space["K"] = spec.K_space.to_tune()
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, scheduler=scheduler_for(spec),
            search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=spec.cfg.seed),
            num_samples=spec.num_samples, trial_dirname_creator=_trial_dirname_creator),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=spec.storage_path, verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[SweepProgress(spec.metric), ReleaseOrphanedPlacementGroups(spec.started_ms)]),
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        spec = plan(args)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


    from moco_ray import trackers
    from tune import results
    from tune.cleanup import release_at_end

    # A local Ray gets one logical CPU more than the machine has, for the trial drivers (TRIAL_CPU
    # each, idle while their TorchTrainer runs), so that a trial can use every core for its workers.
    start_ray(args.address, num_cpus=(os.cpu_count() or 1) + 1, log_to_driver=True)
    try:
        spec, fits = check_cluster(spec)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_concurrent = args.max_concurrent or spec.max_concurrent or fits
    path = storage.at(spec.experiment_path)
    if spec.started_ms is None:
        spec = replace(spec, started_ms=int(time.time() * 1000))
    if not spec.resume:
        spec.save(path)
    workers = list(spec.workers) if isinstance(spec.workers, tuple) else spec.workers
    print(f"[sweep] {'resuming' if spec.resume else 'starting'} {spec.name} in {spec.storage_path}: "
          f"tau {spec.tau}, m {spec.m}, K {spec.K or spec.cfg.K}, {spec.search} search, {spec.scheduler} on "
          f"{spec.metric} ({spec.mode}), {workers} worker(s) per trial on "
          f"{'GPU' if spec.use_gpu else 'CPU'}, up to {max_concurrent} at once, {spec.cfg.epochs} "
          f"epochs each", flush=True)

    t0 = time.perf_counter()
    with trackers.sweep_run(path, spec.cfg.to_dict()):   # --set log_to=mlflow: the trials' parent run
        build_tuner(spec, max_concurrent).fit()
    wall = time.perf_counter() - t0
    release_at_end(spec.started_ms)
    rows = results.collect(path, spec)
    results.write(path, spec, rows)
    print(results.summary(path, spec, rows, wall), flush=True)
    # Interrupted (Ctrl+C): trials still pending or running, or not even created yet (Tune creates
    # them lazily when the concurrency is limited).
    if len(rows) < spec.trials or any(r["status"] not in ("TERMINATED", "ERROR") for r in rows):
        print(f"[sweep] interrupted; continue with: python -m tune.sweep --resume --name {spec.name} "
              f"--storage-path {spec.storage_path}", flush=True)
        return EXIT_INTERRUPTED
    return 1 if any(r["status"] == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
