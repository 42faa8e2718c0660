"""python -m moco_ray.train: the CLI and driver, and the per-worker MoCo loop that Ray Train runs.

    python -m moco_ray.train                                   # demo: digits, local Ray, 2 CPU workers
    python -m moco_ray.train --config moco-v2 --num-workers 4:16 --set data=/data/in1k/train
    ray job submit --working-dir . -- python -m moco_ray.train --config moco-v2 ...
"""
import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moco_ray import checkpoint, config as C

log = logging.getLogger("moco_ray")


# ----------------------------------------------------------------------------------------------------
# The per-worker loop
# ----------------------------------------------------------------------------------------------------

def learning_rate(cfg, batch_effective, progress):
    """lr at `progress` epochs (fractional): base lr scaled to the effective batch, cosine or step."""
    lr = cfg.lr * batch_effective / 256
    if cfg.schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress / cfg.epochs, 1.0)))
    return lr * 0.1 ** sum(progress >= milestone for milestone in cfg.lr_steps)


@contextlib.contextmanager
def backbone_of(encoder):
    """The encoder without its head: the representation the kNN monitor and the export use."""
    head = encoder.fc
    encoder.fc = torch.nn.Identity()
    try:
        yield encoder
    finally:
        encoder.fc = head


def queue_age(queue, step):
    """Age in steps of the oldest key written by training (initial random keys excluded)."""
    written = queue.steps[queue.steps >= 0]
    return step - int(written.min()) if len(written) else 0


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_func(config):
    """Runs on every Ray Train worker; runs again from the latest checkpoint after a restart or resize."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    from moco_ray import data, knn, metrics
    from moco_ray.step import MoCo

    cfg = C.apply_overrides(C.Config(), config["cfg"])
    ctx = ray.train.get_context()
    rank, W, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    device = ray.train.torch.get_device()
    # our logger only: configuring the root logger would turn on Ray Train's INFO line per report
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[moco_ray rank {rank}] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False

    b = cfg.batch_size // W
    B = b * W
    torch.manual_seed(cfg.seed)
    model = MoCo(arch=cfg.arch, dim=cfg.dim, K=cfg.K, m=cfg.m, T=cfg.T, mlp=cfg.mlp,
                 small_stem=cfg.small_stem, bn=cfg.bn, bn_splits=cfg.bn_splits, seed=cfg.seed,
                 head_bn=cfg.head_bn).to(device)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)

    progress = dict(step=0, epoch=0, samples_in_epoch=0, starts=0, knn_init_top1=None, knn_top1=None)
    resumed_from = None
    latest = ray.train.get_checkpoint()
    if latest is not None:
        path = checkpoint.find_valid(latest.path)
        if path is None:
            print(f"[moco_ray] no valid checkpoint under {Path(latest.path).parent}: starting fresh")
        else:
            state, shard, _ = checkpoint.load(path, rank, W, cfg.K)
            model.encoder_q.load_state_dict(state["encoder_q"])
            model.encoder_k.load_state_dict(state["encoder_k"])
            optimizer.load_state_dict(state["optimizer"])
            model.queue.load_state_dict(shard)
            progress.update(state["progress"])
            resumed_from = str(path)
    progress["starts"] += 1
    model.to(device)
    torch.manual_seed(cfg.seed * 1_000_003 + progress["step"] * 1009 + rank)

    if device.type == "cuda":
        model.encoder_q = DistributedDataParallel(model.encoder_q, device_ids=[device.index])
    else:
        model.encoder_q = DistributedDataParallel(model.encoder_q)
    encoder_q = model.encoder_q.module

    info = data.dataset_info(cfg.data)
    n = info["n"]
    steps_per_epoch = n // B
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    meter = metrics.WorkerMetrics(cfg.metrics_port + local_rank, run=ctx.get_experiment_name(), rank=rank) \
        if cfg.metrics_port else None
    sample_log = _SampleLog(cfg.sample_log, rank, progress["step"]) if cfg.sample_log else None

    def run_knn():
        if not cfg.knn_data:
            return None
        bank = data.make_eval_loader(cfg.data, batch_size=max(b, 64), rank=rank, world_size=W,
                                     res=cfg.res, device=device)
        query = data.make_eval_loader(cfg.knn_data, batch_size=max(b, 64), rank=rank, world_size=W,
                                      res=cfg.res, device=device)
        with backbone_of(encoder_q) as backbone:
            return knn.knn_top1(backbone, bank, query, info["num_classes"], cfg.knn_k, cfg.knn_t, device)

    def save(metrics):
        meta = {k: progress[k] for k in ("step", "epoch", "samples_in_epoch")}
        state = {
            "encoder_q": encoder_q.state_dict(),
            "encoder_k": model.encoder_k.state_dict(),
            "optimizer": optimizer.state_dict(),
            "progress": dict(progress),
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "world_size": W,
        }
        with tempfile.TemporaryDirectory() as tmp:
            seconds = checkpoint.save(tmp, rank, W, state, model.queue.state_dict(), meta)
            metrics = dict(metrics, checkpoint_save_s=seconds)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint.dir_name(progress["step"], progress["starts"]))

    if progress["knn_init_top1"] is None and progress["step"] == 0:
        progress["knn_init_top1"] = run_knn()
    ray.train.report({"event": "start", "world_size": W, "step": progress["step"],
                      "epoch": progress["epoch"], "resumed_from": resumed_from,
                      "batch_effective": B, "total_steps": total_steps,
                      "knn_init_top1": progress["knn_init_top1"], "config": cfg.to_dict()})

    images_seen, t_run, last, knn_step = 0, time.perf_counter(), {}, None
    while progress["epoch"] < cfg.epochs and progress["step"] < total_steps:
        epoch = progress["epoch"]
        loader = data.make_train_loader(
            cfg.data, seed=cfg.seed, epoch=epoch, start=progress["samples_in_epoch"],
            batch_per_worker=b, rank=rank, world_size=W, res=cfg.res, aug=cfg.aug, device=device,
            num_workers=cfg.loader_workers, crop_min=cfg.crop_min)
        t_end = time.perf_counter()
        for im_q, im_k, _, sample_id in loader:
            t_data = time.perf_counter()
            lr = learning_rate(cfg, B, epoch + progress["samples_in_epoch"] / n)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, stats = model(im_q, im_k, progress["step"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if sample_log:
                sample_log.write(epoch, progress["step"], sample_id)
            progress["step"] += 1
            progress["samples_in_epoch"] += B
            images_seen += b
            t_step = time.perf_counter()
            last = {
                "event": "step", "step": progress["step"], "epoch": epoch,
                "samples_in_epoch": progress["samples_in_epoch"], "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "loss": loss.item(), "lr": lr,
                "accuracy": float(stats["acc"]),
                "images": images_seen, "step_time_s": t_step - t_end, "data_wait_s": t_data - t_end,
                "images_per_s": images_seen * W / (t_step - t_run), "batch_effective": B,
                "world_size": W, "restarts": progress["starts"] - 1,
                "queue_keys": len(model.queue), "queue_age_steps": queue_age(model.queue, progress["step"]),
                "knn_top1": progress["knn_top1"], "knn_init_top1": progress["knn_init_top1"],
                "rss_bytes": _rss_bytes(),
            }
            last["data_wait_share"] = last["data_wait_s"] / max(last["step_time_s"], 1e-9)
            if device.type == "cuda":
                last["gpu_memory_bytes"] = torch.cuda.memory_allocated(device)
            if meter:
                meter.update(last)
            t_end = t_step
            done = progress["step"] >= total_steps
            epoch_ends = progress["samples_in_epoch"] + B > n
            if progress["step"] % cfg.checkpoint_every_steps == 0 and not (done or epoch_ends):
                save(last)
            elif progress["step"] % cfg.report_every == 0 and not done:
                ray.train.report(last)
            if done:
                break
        if progress["samples_in_epoch"] + B <= n:
            break  # stopped by max_steps in the middle of the epoch
        progress["epoch"] += 1
        progress["samples_in_epoch"] = 0
        last_epoch = progress["epoch"] >= cfg.epochs
        last["epoch"] = progress["epoch"]
        if cfg.knn_every and (progress["epoch"] % cfg.knn_every == 0 or last_epoch):
            progress["knn_top1"], knn_step = run_knn(), progress["step"]
            last["knn_top1"] = progress["knn_top1"]
            if meter:
                meter.update(last)
        if not (progress["step"] >= total_steps or last_epoch):
            save(dict(last, event="epoch"))

    if knn_step != progress["step"]:
        progress["knn_top1"] = run_knn()
    final = dict(last, event="end", epoch=progress["epoch"], step=progress["step"],
                 knn_top1=progress["knn_top1"], knn_init_top1=progress["knn_init_top1"],
                 train_s=time.perf_counter() - t_run)
    save(final)
    if sample_log:
        sample_log.close()


class _SampleLog:
    """Audit of exactly-once: the sample ids each step of this worker actually consumed."""

    def __init__(self, directory, rank, start_step):
        Path(directory).mkdir(parents=True, exist_ok=True)
        segment = [time.time_ns()]
        if dist.is_initialized():
            dist.broadcast_object_list(segment, src=0)
        self.segment = segment[0]
        self.f = open(Path(directory) / f"samples-{self.segment}-{rank:04d}.jsonl", "a")
        self.rank = rank

    def write(self, epoch, step, sample_id):
        self.f.write(json.dumps({"segment": self.segment, "rank": self.rank, "pid": os.getpid(), "epoch": epoch,
                                 "step": step, "ids": sample_id.tolist()}) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------

def parse_workers(text):
    """'N' -> N, 'MIN:MAX' -> (MIN, MAX); ConfigError on nonsense."""
    try:
        if ":" in str(text):
            lo, hi = (int(v) for v in str(text).split(":"))
        else:
            lo = hi = int(text)
    except ValueError:
        raise C.ConfigError(f"--num-workers expects N or MIN:MAX, got {text!r}") from None
    if lo < 1:
        raise C.ConfigError(f"--num-workers: MIN must be >= 1, got {lo}")
    if lo > hi:
        raise C.ConfigError(f"--num-workers: MIN ({lo}) is larger than MAX ({hi})")
    return lo if lo == hi else (lo, hi)


def max_workers(workers):
    return workers[1] if isinstance(workers, tuple) else workers


def build_parser():
    p = argparse.ArgumentParser(prog="python -m moco_ray.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo", help="preset (demo, moco-v1, moco-v2) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set T=0.2 (repeatable)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, set by `ray job submit`; else start a local Ray)")
    p.add_argument("--num-workers", default="2", help="N, or MIN:MAX for elastic training (default 2)")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group failures to survive")
    p.add_argument("--resize-interval-s", type=float, default=60.0,
                   help="with MIN:MAX, how often Ray checks whether the group can grow")
    p.add_argument("--use-gpu", choices=("auto", "true", "false"), default="auto")
    p.add_argument("--storage-path", default=str(Path("~/moco_ray_runs").expanduser()),
                   help="where runs, checkpoints and metrics are stored (shared storage on a cluster)")
    p.add_argument("--name", default=None, help="run name (default: CONFIG-TIMESTAMP)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run --name (default: the newest run) from its latest checkpoint")
    return p


def resolve_data(cfg):
    """The embedded digits when no dataset is given (built on first use); dataset checks."""
    from moco_ray import data

    if not cfg.data:
        from data_prep.demo import build_demo, default_demo_root

        paths = build_demo(default_demo_root())
        cfg = C.apply_overrides(cfg, {"data": str(paths["train"]), "knn_data": str(paths["val"])})
    for key in ("data", "knn_data"):
        if getattr(cfg, key):
            try:
                data.dataset_info(getattr(cfg, key))
            except (FileNotFoundError, ValueError) as e:
                raise C.ConfigError(f"{key}: {e}") from None
    return cfg


def run_dir_name(args, storage_path):
    if args.name:
        name = args.name
        exists = (storage_path / name).exists()
        if exists and not args.resume:
            raise C.ConfigError(f"run {name!r} already exists in {storage_path}; pass --resume "
                                f"to continue it, or another --name")
        if args.resume and not exists:
            raise C.ConfigError(f"--resume: no run {name!r} in {storage_path}")
        return name
    if args.resume:
        runs = sorted((p for p in storage_path.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise C.ConfigError(f"--resume: no runs in {storage_path}")
        return runs[-1].name
    stem = Path(args.config).stem if not args.config in C.PRESETS else args.config
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_trainer(cfg, workers, use_gpu, storage_path, name, max_failures=0, callbacks=(),
                 resize_interval_s=60.0):
    """The TorchTrainer for one run; the sweep builds its trials with this too."""
    import ray.train
    from ray.train.torch import TorchTrainer

    scaling = ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                      resources_per_worker=None if use_gpu else {"CPU": 1},
                                      elastic_resize_monitor_interval_s=resize_interval_s)
    run = ray.train.RunConfig(
        name=name, storage_path=str(storage_path),
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        callbacks=list(callbacks),
    )
    return TorchTrainer(train_func, train_loop_config={"cfg": cfg.to_dict()},
                        scaling_config=scaling, run_config=run)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cfg = C.load(args.config, args.set)
        workers = parse_workers(args.num_workers)
        C.validate(cfg, max_workers(workers))
        storage_path = Path(args.storage_path).expanduser().resolve()
        name = run_dir_name(args, storage_path)
        cfg = resolve_data(cfg)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray

    from moco_ray.progress import ProgressCallback, watch

    address = args.address or os.environ.get("RAY_ADDRESS")  # set by `ray job submit`
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        # "local": never join a cluster that `ray start` left behind (or that died)
        ray.init(address=address or "local")
    use_gpu = {"true": True, "false": False}.get(args.use_gpu)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if cfg.bn == "sync" and not use_gpu:
        print("error: bn=sync needs GPUs (torch's SyncBatchNorm); use bn=shuffle on CPU", file=sys.stderr)
        return 2
    print(f"[moco_ray] run {name} in {storage_path}, workers {args.num_workers}, "
          f"{'GPU' if use_gpu else 'CPU'}; config:\n{C.describe(cfg)}", flush=True)

    t0 = time.perf_counter()
    trainer = make_trainer(cfg, workers, use_gpu, storage_path, name, args.max_failures,
                           callbacks=[ProgressCallback(storage_path / name)],
                           resize_interval_s=args.resize_interval_s)
    result = watch(storage_path / name, trainer.fit)
    wall = time.perf_counter() - t0
    m = result.metrics or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    print("\n[moco_ray] summary")
    print(f"  epochs          {m.get('epoch')} / {cfg.epochs}")
    print(f"  steps           {m.get('step')}")
    print(f"  final loss      {fmt(m.get('loss'))}")
    print(f"  kNN top-1       {fmt(m.get('knn_top1'))} %  (random init: {fmt(m.get('knn_init_top1'))} %)")
    print(f"  images/s        {fmt(m.get('images_per_s'))}")
    print(f"  wall time       {wall:.0f} s")
    print(f"  checkpoint      {result.checkpoint.path if result.checkpoint else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
