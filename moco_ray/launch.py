"""The driver of every command that runs a TorchTrainer: `moco_ray.train` (pretraining),
`moco_ray.lincls` (linear evaluation) and `tune.sweep` (one trainer per trial) parse their arguments
and call, in this order:

    plan(args)        -> RunPlan    every check that needs no Ray (ConfigError: one line, exit 2)
    connect(args)     -> use_gpu    start_ray (join the cluster, or a local Ray), the GPU choice
    fit(args, run, use_gpu)         record the config, make_trainer, trainer.fit with live progress

The per-worker loops that Ray Train runs are in moco_ray.worker (pretraining) and moco_ray.lincls.
"""
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple, Union

from moco_ray import config, rundir, storage


def parse_workers(text):
    """'N' -> N, 'MIN:MAX' -> (MIN, MAX); ConfigError on nonsense."""
    try:
        if ":" in str(text):
            lo, hi = (int(v) for v in str(text).split(":"))
        else:
            lo = hi = int(text)
    except ValueError:
        raise config.ConfigError(f"--num-workers expects N or MIN:MAX, got {text!r}") from None
    if lo < 1:
        raise config.ConfigError(f"--num-workers: MIN must be >= 1, got {lo}")
    if lo > hi:
        raise config.ConfigError(f"--num-workers: MIN ({lo}) is larger than MAX ({hi})")
    return lo if lo == hi else (lo, hi)


def max_workers(workers):
    return workers[1] if isinstance(workers, tuple) else workers


def add_run_arguments(p, presets, what="run"):
    """The options of every CLI that runs TorchTrainers, declared once: moco_ray.train and
    moco_ray.lincls (what="run": one run on --num-workers workers) and tune.sweep (what="sweep": a
    run per trial, each on the sweep's own --workers-per-trial)."""
    sweep = what == "sweep"
    p.add_argument("--config", default="demo",
                   help=f"{'base config: ' if sweep else ''}preset ({', '.join(presets)}) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set T=0.2 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: start a local Ray)" if sweep else
                   "Ray cluster address (default: $RAY_ADDRESS, set by `ray job submit`; else start a local Ray)")
    p.add_argument("--max-failures", type=int, default=1 if sweep else 3,
                   help="worker-group failures a run survives (a sweep: each trial's run)")
    p.add_argument("--use-gpu", choices=("auto", "true", "false"), default="auto")
    stored = "sweeps, their trials' runs" if sweep else "runs"
    p.add_argument("--storage-path", default="~/moco_ray_runs",
                   help=f"where {stored}, checkpoints and metrics are stored: a local path, or on a cluster a "
                        "URI of any pyarrow filesystem (s3://bucket/runs, gs://..., abfs://...) or a path every "
                        "node mounts")
    p.add_argument("--name", default=None, help=f"{what} name (default: {'sweep-' if sweep else ''}CONFIG-TIMESTAMP)")
    rundir.add_arguments(p, what, allow_change=not sweep)
    if sweep:
        return
    p.add_argument("--num-workers", default="2", help="N, or MIN:MAX for elastic training (default 2)")
    p.add_argument("--resize-interval-s", type=float, default=60.0,
                   help="with MIN:MAX, how often Ray checks whether the group can grow")
    p.add_argument("--log-to", default=None, metavar="tensorboard,mlflow,wandb",
                   help="trackers that get the run's records (config key log_to; default none)")


def resolve_data(cfg, splits=("data", "knn_data")):
    """The embedded dataset when no dataset is given (built on first use): its train split for
    splits[0], its val split for splits[1]; dataset checks."""
    from moco_ray import data

    if not getattr(cfg, splits[0]):
        from data_prep.demo import build_demo, default_demo_root

        paths = build_demo(default_demo_root())
        cfg = config.apply_overrides(cfg, {splits[0]: str(paths["train"]), splits[1]: str(paths["val"])})
    for key in splits:
        if getattr(cfg, key):
            try:
                data.dataset_info(getattr(cfg, key))
            except (FileNotFoundError, ValueError) as e:
                raise config.ConfigError(f"{key}: {e}") from None
    return cfg


def run_dir_name(args, storage_path, cfg, prefix=""):
    """The run's name (default: PREFIX + CONFIG-TIMESTAMP); a continued run must run with the config
    it recorded (see moco_ray.rundir)."""
    stem = args.config if args.config in config.PRESETS else Path(args.config).stem
    name, continuing = rundir.resolve(storage_path, args.name, args.resume,
                                      f"{prefix}{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if continuing:
        from moco_ray import trackers

        allowed = rundir.allowed_changes(args.allow_change) | set(trackers.KEYS)
        rundir.check_config(storage_path / name, cfg.to_dict(), allowed)
    return name


def make_trainer(cfg, workers, use_gpu, storage_path, name, max_failures=0, callbacks=(),
                 resize_interval_s=60.0, loop=None):
    """The TorchTrainer for one run, with its RunLog (RUN_DIR/metrics.jsonl, start and resize lines);
    the sweep builds its trials with this too. loop: the per-worker function (default: pretraining's
    moco_ray.worker.train_func)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from moco_ray import trackers
    from moco_ray.progress import ProgressCallback, start_run_log
    from moco_ray.worker import train_func

    storage_path = storage.at(storage_path)
    release_reservation(storage_path / name)
    run_log = start_run_log(storage_path / name,
                            trackers=trackers.build(cfg.log_to, storage_path / name, cfg.mlflow_uri))
    path, filesystem = storage.ray_storage(storage_path)

    scaling = ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                      resources_per_worker=None if use_gpu else {"CPU": 1},
                                      elastic_resize_monitor_interval_s=resize_interval_s)
    run = ray.train.RunConfig(
        name=name, storage_path=path, storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        callbacks=[*callbacks, ProgressCallback(run_log)],
        # Ray Train's own INFO lines (worker-group start, every checkpoint upload) stay in the
        # session's log files; the console gets our lines (the RunLog's) and warnings
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )
    loop_config = {"cfg": cfg.to_dict(), "run_log": run_log, "run_dir": str(storage_path / name)}
    return TorchTrainer(loop or train_func, train_loop_config=loop_config,
                        scaling_config=scaling, run_config=run)


def release_reservation(run_dir):
    """What a killed driver of this run left reserved, freed now instead of in 180 s (reservation.py)."""
    from moco_ray.progress import PREFIX
    from moco_ray.reservation import release_stale

    try:
        released = release_stale(run_dir)
    except Exception as e:   # only costs the wait
        print(f"{PREFIX} could not release the previous driver's reservation: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        return
    if released:
        print(f"{PREFIX} released the workers' resources still reserved by the previous driver ({released})",
              flush=True)


@dataclass(frozen=True)
class RunPlan:
    """One run, as plan() checked it before Ray starts."""
    user_cfg: config.Config                 # the config as given: what RUN_DIR records
    cfg: config.Config                      # with the data resolved (the embedded dataset when none is given)
    workers: Union[int, Tuple[int, int]]   # N, or (MIN, MAX) for elastic training
    storage_path: storage.Location
    name: str                          # the run directory is storage_path / name


def plan(args, kind=config.Config, splits=("data", "knn_data"), overrides=(), prefix=""):
    """Everything checked before Ray starts, as a RunPlan. ConfigError on bad input."""
    log_to = [] if getattr(args, "log_to", None) is None else [f"log_to={args.log_to}"]
    cfg = config.load(args.config, [*args.set, *log_to, *overrides], kind)
    workers = parse_workers(args.num_workers)
    config.validate(cfg, max_workers(workers), workers[0] if isinstance(workers, tuple) else workers)
    storage_path = storage.at(args.storage_path)   # ConfigError for a URI without a filesystem
    from moco_ray import trackers

    trackers.check_storage(cfg.log_to, cfg.mlflow_uri, storage_path)   # mlflow's default store is local
    name = run_dir_name(args, storage_path, cfg, prefix)
    return RunPlan(cfg, resolve_data(cfg, splits), workers, storage_path, name)


def start_ray(address=None, num_cpus=None, num_gpus=None, **init_kwargs):
    """Join the Ray cluster at `address`, or, with None, start a Ray of this process's own: address
    "local", never a cluster that `ray start` left behind (or that died), with token authentication
    off unless RAY_AUTH_MODE says otherwise (a local Ray that only this machine reaches). num_cpus,
    num_gpus: the local Ray's resources (a joined cluster has its own); init_kwargs go to ray.init.
    Nothing happens when this process is already connected."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        resources = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v is not None}
        ray.init(address="local", **resources, **init_kwargs)
    else:
        ray.init(address=address, **init_kwargs)


def connect(args):
    """Join the cluster (--address, or $RAY_ADDRESS under `ray job submit`) or start a local Ray;
    returns whether the run uses GPUs."""
    import ray

    start_ray(args.address or os.environ.get("RAY_ADDRESS"))   # RAY_ADDRESS: set by `ray job submit`
    warning = storage.multi_node_warning(args.storage_path, sum(1 for n in ray.nodes() if n.get("Alive")))
    if warning:
        print(f"[moco_ray] {warning}", file=sys.stderr, flush=True)
    use_gpu = {"true": True, "false": False}.get(args.use_gpu)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    return use_gpu


def fit(args, run, use_gpu, loop=None):
    """Record the run's config (run: a RunPlan), then train with live progress; returns (Result, wall
    seconds)."""
    from moco_ray.progress import watch

    cfg, storage_path, name = run.cfg, run.storage_path, run.name
    print(f"[moco_ray] run {name} in {storage_path}, workers {args.num_workers}, "
          f"{'GPU' if use_gpu else 'CPU'}; config:\n{config.describe(cfg)}", flush=True)
    rundir.set_aside_torn_ray_snapshot(storage_path / name)
    rundir.record_config(storage_path / name, run.user_cfg.to_dict())
    t0 = time.perf_counter()
    trainer = make_trainer(cfg, run.workers, use_gpu, storage_path, name, args.max_failures,
                           resize_interval_s=args.resize_interval_s, loop=loop)
    try:
        result = watch(storage_path / name, trainer.fit)
    finally:
        if cfg.log_to:
            flush_trackers(trainer)
    return result, time.perf_counter() - t0


def flush_trackers(trainer, timeout_s=30.0):
    """Wait (bounded) until the trackers have every record: the driver's exit ends the RunLog actor."""
    import ray

    from moco_ray.progress import PREFIX

    try:
        stats = ray.get(trainer.train_loop_config["run_log"].flush_trackers.remote(timeout_s),
                        timeout=4 * timeout_s)
    except Exception as e:
        print(f"{PREFIX} trackers: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return
    for name, s in stats.items():
        if s["dropped"] or s["errors"] or s["queued"]:
            print(f"{PREFIX} {name}: {s['dropped']} records dropped, {s['errors']} failed, "
                  f"{s['queued']} undelivered", file=sys.stderr, flush=True)
