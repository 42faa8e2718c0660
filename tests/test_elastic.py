"""Elastic training on a real multi-node Ray cluster (ray.cluster_utils.Cluster, 1-CPU nodes):
grow, kill a worker, shrink; every sample of every epoch consumed exactly once across all of it.
The run is MoCo v3 (demo-v3) on a timm backbone with its storage and sample log on S3 (moto): the
v1/v2 resizes are bench/chaos.py's (tests/test_chaos.py), on a local disk."""
import os
import signal
import time

import pytest

from moco_ray import storage
from moco_ray.data import dataset_info
from moco_ray.progress import read_metrics
from moco_ray.record_parts import parse
from moco_ray.sample_log import exactly_once_problems

# timm's smallest test ResNet (0.4M parameters, 96 features): a step at 16 px costs ~1/30 of the
# small-stem resnet18's, and its checkpoints are small enough to upload to S3 every few steps.
TIMM_ARCH = "timm:test_resnet"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(s3):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's single-node instance; ray_session starts it again when needed
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()
    del os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]


def rows(run_dir):
    return read_metrics(run_dir)


def wait_for(predicate, what, fit, timeout=240):
    """predicate()'s first true value; fails at once when the run `fit` ended before it."""
    import ray

    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        assert not ray.wait([fit], timeout=0)[0], f"the run ended before {what}: {ray.get(fit)}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def starts(run_dir):
    return [r for r in rows(run_dir) if r.get("event") == "start"]


def checkpoint_after(run_dir, n_starts):
    """A checkpointed report made by the group that started n_starts-th."""
    seen = 0
    for r in rows(run_dir):
        seen += r.get("event") == "start"
        if seen == n_starts and r.get("checkpoint") and r.get("event") != "start":
            return r
    return None


def sample_records(samples):
    directory = storage.at(samples)
    return [r for name in directory.listdir() if name.startswith("samples-")
            for r in parse((directory / name).read_bytes())]


def test_grow_kill_shrink_exactly_once(cluster, digits, prefix):
    import ray

    from conftest import tiny_run_args
    from moco_ray.train import main

    # 3 epochs of 44 steps: the faults below take ~40 of them, the rest finishes at W=1
    run_dir, samples, epochs = f"{prefix}/runs/elastic", f"{prefix}/samples", 3
    args = ["--config", "demo-v3"] + tiny_run_args(digits, f"{prefix}/runs", "elastic", "--num-workers", "1:2",
                                                   "--max-failures", "5", "--resize-interval-s", "1")
    args += ["--set", f"arch={TIMM_ARCH}", "--set", "small_stem=false",
             "--set", f"sample_log={samples}", "--set", "batch_size=32", "--set", "K=256",
             "--set", "res=16", "--set", f"epochs={epochs}", "--set", "knn_every=0",
             "--set", "checkpoint_every_steps=5", "--set", "knn_data=",
             "--set", "precision=fp32"]   # see 'bf16 on the CPU' in conftest.py
    cluster.add_node(num_cpus=1)
    fit = ray.remote(num_cpus=0)(main).remote(args)

    # (a) grow: one node, then a second joins; the group grows to 2 and resumes from the checkpoint
    wait_for(lambda: checkpoint_after(run_dir, 1), "a checkpoint with W=1", fit)
    second = cluster.add_node(num_cpus=1)
    wait_for(lambda: len(starts(run_dir)) >= 2, "the resize to W=2", fit)
    grown = starts(run_dir)[1]
    assert (starts(run_dir)[0]["world_size"], grown["world_size"]) == (1, 2)
    assert grown["resumed_from"] is not None and grown["step"] > 0

    # (c) kill: SIGKILL one training worker; the group restarts from the latest checkpoint
    wait_for(lambda: checkpoint_after(run_dir, 2), "a checkpoint with W=2", fit)
    records = sample_records(samples)
    newest = max(r["segment"] for r in records)
    victim = next(r["pid"] for r in records if r["segment"] == newest and r["rank"] == 1)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(starts(run_dir)) >= 3, "the restart after the kill", fit)
    assert starts(run_dir)[2]["resumed_from"] is not None

    # (b) shrink: a node is lost; training resumes with one worker and finishes
    wait_for(lambda: checkpoint_after(run_dir, 3), "a checkpoint after the restart", fit)
    cluster.remove_node(second)
    assert ray.get(fit, timeout=600) == 0
    final = starts(run_dir)[-1]
    assert final["world_size"] == 1 and final["resumed_from"] is not None
    assert rows(run_dir)[-1]["event"] == "end" and rows(run_dir)[-1]["epoch"] == epochs
    assert rows(run_dir)[0]["config"]["method"] == "v3" and rows(run_dir)[0]["config"]["arch"] == TIMM_ARCH

    # (d) exactly once per epoch, from the ids the workers actually consumed
    n = dataset_info(digits["train"])["n"]
    assert exactly_once_problems(samples, n, batch=32, epochs=epochs) == []
