"""python -m moco_ray.train: the pretraining CLI. It parses, then runs moco_ray.launch's plan, connect
and fit; the per-worker loop that Ray Train runs is moco_ray.worker.train_func.

    python -m moco_ray.train                                   # demo: embedded dataset, local Ray, 2 CPU workers
    python -m moco_ray.train --config moco-v2 --num-workers 4:16 --set data=/data/in1k/train
    ray job submit --working-dir . -- python -m moco_ray.train --config moco-v2 ...
    python -m moco_ray.train --config moco-v2 ... --name RUN --resume auto   # continue RUN, or start it
    python -m moco_ray.train --config moco-v2 ... --storage-path s3://bucket/runs   # any pyarrow URI
"""
import argparse
import sys
from dataclasses import replace

from moco_ray import config, launch
from moco_ray.metrics import KNN_INIT_TOP1, KNN_PIXELS_TOP1, KNN_TOP1


def build_parser():
    p = argparse.ArgumentParser(prog="python -m moco_ray.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    launch.add_run_arguments(p, config.PRESETS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run = launch.plan(args)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_gpu = launch.connect(args)
    if run.cfg.bn == "sync" and not use_gpu:
        print("error: bn=sync needs GPUs (torch's SyncBatchNorm); use bn=shuffle on CPU", file=sys.stderr)
        return 2
    try:
        run = replace(run, cfg=config.for_device(run.cfg, cuda=use_gpu))
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from moco_ray.precision import native_bf16_cpu   # torch: not before the config's checks

    if run.cfg.precision == "bf16" and not use_gpu and not native_bf16_cpu():
        print("[moco_ray] warning: precision=bf16 on a CPU without bf16 instructions (AVX512-BF16, AMX) is "
              "emulated and slower than fp32; --set precision=fp32 runs faster here", file=sys.stderr, flush=True)

    result, wall = launch.fit(args, run, use_gpu)
    m = result.metrics or {}
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    print("\n[moco_ray] summary")
    print(f"  epochs          {m.get('epoch')} / {run.cfg.epochs}")
    print(f"  steps           {m.get('step')}")
    print(f"  final loss      {fmt(m.get('loss'))}")
    print(f"  kNN top-1       {fmt(m.get(KNN_TOP1))} %  (raw pixels: {fmt(m.get(KNN_PIXELS_TOP1))} %, "
          f"random init: {fmt(m.get(KNN_INIT_TOP1))} %)")
    print(f"  images/s        {fmt(m.get('images_per_s'))}")
    print(f"  wall time       {wall:.0f} s")
    print(f"  checkpoint      {result.checkpoint.path if result.checkpoint else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
