"""Cost of the per-step metrics path: steps/s with a RunLog record every step against none, in one run.

    .venv/bin/python bench/report.py                  # demo model, 2 CPU workers, 60 steps per trial
    .venv/bin/python bench/report.py --steps 100 --repeats 3

One Ray session runs short demo trainings (no kNN, no checkpoints until the end), alternating
off, on, off, on, ... so drift hits both alike:
  on:  report_every=1, rank 0 sends every step's record to the run's RunLog actor (metrics.jsonl,
       the driver's progress), which is what every run does every report_every steps;
  off: report_every=0, no per-step records at all.
steps/s of a trial = steps / the worker's training time (the end record's train_s). Then, for the
record, the cost of one ray.train.report without a checkpoint (what every step's metrics cost before
they moved off it): a 2-worker Ray Train loop that only calls report, timed in the workers.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moco_ray import config as C  # noqa: E402


def trial(cfg, workers, storage, name):
    from moco_ray import launch

    m = launch.make_trainer(cfg, workers, False, storage, name).fit().metrics
    return m["step"] / m["train_s"]


def report_loop(config):
    import ray.train

    ray.train.report({"i": -1})  # the first one also waits for the controller's start
    t0 = time.perf_counter()
    for i in range(config["n"]):
        ray.train.report({"i": i})
    # Result.metrics keeps only checkpoint reports: the number goes back in a file (one machine)
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(str((time.perf_counter() - t0) / config["n"]))


def report_cost(workers, storage, n):
    import ray.train
    from ray.train.torch import TorchTrainer

    out = Path(storage) / "seconds_per_report"
    trainer = TorchTrainer(report_loop, train_loop_config={"n": n, "out": str(out)},
                           scaling_config=ray.train.ScalingConfig(num_workers=workers),
                           run_config=ray.train.RunConfig(name="report-cost", storage_path=storage))
    trainer.fit()
    return float(out.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per trial")
    p.add_argument("--repeats", type=int, default=2, help="trials per setting (alternating)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reports", type=int, default=10, help="ray.train.report calls timed")
    args = p.parse_args()

    import ray

    from moco_ray import launch

    launch.start_ray(num_cpus=max(args.workers, 2), include_dashboard=False, log_to_driver=False)
    base = launch.resolve_data(C.load("demo", [f"max_steps={args.steps}", "checkpoint_every_steps=100000",
                                              "knn_every=0", "metrics_port=0"]))
    base = C.apply_overrides(base, {"knn_data": ""})
    rates = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as storage:
        for r in range(args.repeats):
            for mode, every in (("off", 0), ("on", 1)):
                cfg = C.apply_overrides(base, {"report_every": every})
                rates[mode].append(trial(cfg, args.workers, storage, f"{mode}-{r}"))
                print(f"trial {r} per-step metrics {mode:3s}: {rates[mode][-1]:.3f} steps/s", flush=True)
        per_report = report_cost(args.workers, storage, args.reports)
    ray.shutdown()

    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    spread = lambda v: f"median of {len(v)}, range {min(v):.3f}-{max(v):.3f}"
    print(f"\n{'per-step metrics':<34}{'steps/s':>10}   spread")
    print(f"{'off (report_every=0)':<34}{off:>10.3f}   {spread(rates['off'])}")
    print(f"{'on  (RunLog record every step)':<34}{on:>10.3f}   {spread(rates['on'])}")
    print(f"{'ratio on/off':<34}{on / off:>10.3f}   (target >= 0.98)")
    print(f"\none ray.train.report without a checkpoint: {per_report:.3f} s "
          f"({per_report * off:.1f} steps of this run; a step is {1 / off:.3f} s)")


if __name__ == "__main__":
    main()
