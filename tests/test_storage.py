"""Run directories on a URI (moco_ray.storage) against a real S3 endpoint on localhost: moto's
standalone server, started once per test session on a free port. pyarrow's S3 filesystem reaches it
through the standard AWS environment (AWS_ENDPOINT_URL_S3, dummy credentials): the project's code has
no special case for it, and the same `s3://bucket/...` URIs would reach AWS."""
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from moco_ray import checkpoint, export, record_parts, report, rundir, storage
from moco_ray.config import ConfigError
from test_export import write_checkpoint
from test_report import check_png, synthetic_run

REPO = Path(__file__).resolve().parents[1]


def upload_checkpoint(tmp_path, uri, step, **kw):
    """A checkpoint written locally (as a worker writes it) and uploaded to `uri`/checkpoint_STEP."""
    local = write_checkpoint(tmp_path / f"local-{step}", "resnet18", step, **kw)
    target = storage.at(uri) / checkpoint.dir_name(step)
    target.upload(local)
    return target


def test_locations_resolve_and_join(prefix, tmp_path):
    loc = storage.at(prefix) / "a" / "b.txt"
    assert str(loc) == f"{prefix}/a/b.txt" and loc.name == "b.txt" and not loc.is_local
    assert not loc.exists()
    loc.write_text("hello")
    assert loc.read_text() == "hello" and loc.is_file() and loc.parent.is_dir()
    assert storage.at(prefix).listdir() == ["a"]
    assert pickle_roundtrip(loc) == loc and pickle_roundtrip(loc).read_text() == "hello"
    storage.at(prefix).delete_tree()
    assert not loc.exists() and storage.at(prefix).listdir() == []

    local = storage.at(str(tmp_path / "x" / ".." / "y"))
    assert local.is_local and local.path == str(tmp_path / "y") and local == tmp_path / "y"
    assert storage.at("~/r").path == os.path.expanduser("~/r")


def pickle_roundtrip(obj):
    import pickle

    return pickle.loads(pickle.dumps(obj))


def test_a_uri_without_a_filesystem_is_a_config_error():
    with pytest.raises(ConfigError, match="no filesystem") as e:
        storage.at("nosuchfs://bucket/runs")
    assert "\n" not in str(e.value)


def test_relative_paths_on_several_nodes_warn():
    assert storage.multi_node_warning("runs", 1) is None
    assert storage.multi_node_warning("/shared/runs", 3) is None
    assert storage.multi_node_warning("s3://b/runs", 3) is None
    for path in ("runs", "~/moco_ray_runs"):
        assert "3-node" in storage.multi_node_warning(path, 3) and "s3://" in storage.multi_node_warning(path, 3)


def test_metric_parts_roll_on_an_object_store_and_read_in_order(prefix):
    writer = record_parts.PartWriter(prefix, "metrics", records_per_part=3, flush_s=0)
    tail = record_parts.PartTail(prefix, "metrics")
    for i in range(7):
        writer.write({"i": i})
    assert [loc.name for _, loc in record_parts.parts(prefix, "metrics")] == \
        ["metrics.jsonl", "metrics-00001.jsonl", "metrics-00002.jsonl"]
    assert [r["i"] for r in tail.read()] == list(range(7))
    writer.write({"i": 7})
    assert [r["i"] for r in tail.read()] == [7] and tail.read() == []

    # a buffered writer: nothing visible until its flush (a reader's delay is at most flush_s)
    slow = record_parts.PartWriter(prefix, "metrics", records_per_part=3, flush_s=3600)
    slow.write({"i": 8})
    assert tail.read() == []
    slow.flush()
    assert [r["i"] for r in tail.read()] == [8]
    assert [r["i"] for r in record_parts.read_records(prefix, "metrics")] == list(range(9))
    assert record_parts.parts(prefix, "metrics")[-1][0] == 3   # the continuing writer's own part


def test_metric_record_on_a_local_disk_is_one_appended_file(tmp_path):
    for _ in range(2):   # a continuing writer appends to the same file
        writer = record_parts.PartWriter(tmp_path, "metrics", records_per_part=3)
        for i in range(4):
            writer.write({"i": i})
    assert [loc.name for _, loc in record_parts.parts(tmp_path, "metrics")] == ["metrics.jsonl"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 8


def test_checkpoints_on_s3_verify_fall_back_and_load(prefix, tmp_path, caplog):
    old = upload_checkpoint(tmp_path, prefix, 10, K=1000, world_size=2)
    new = upload_checkpoint(tmp_path, prefix, 20, K=1000, world_size=2)
    assert checkpoint.in_run(prefix) == [new, old]
    assert checkpoint.newest_valid(prefix) == new and checkpoint.next_group(prefix) == 1
    assert checkpoint.verify(new)["step"] == 20

    state, shard, manifest = checkpoint.load(str(new), 1, 2, 1000)
    local = tmp_path / "local-20"
    expected = torch.load(local / checkpoint.queue_file(1), weights_only=False)
    assert torch.equal(shard["keys"], expected["keys"]) and state["progress"] == {"step": 20}
    assert [len(s["keys"]) for s in (checkpoint.load(new, r, 3, 1000)[1] for r in range(3))] == [334, 333, 333]

    # a corrupt queue file (same size): the hash catches it and the previous checkpoint is used
    data = bytearray((new / checkpoint.queue_file(1)).read_bytes())
    data[100:108] = b"garbage!"
    (new / checkpoint.queue_file(1)).write_bytes(bytes(data))
    assert checkpoint.newest_valid(prefix) == old
    assert "corrupt" in caplog.text
    # a partial save (no manifest) is skipped too
    partial = upload_checkpoint(tmp_path, prefix, 30)
    (partial / checkpoint.MANIFEST).delete()
    assert checkpoint.find_valid(partial) == old


def test_rundir_start_record_and_resume_on_s3(prefix):
    runs = storage.at(prefix) / "runs"
    assert rundir.resolve(str(runs), "a", "auto", None) == ("a", False)
    with pytest.raises(ConfigError, match="no run 'a'"):
        rundir.resolve(str(runs), "a", "yes", None)
    rundir.record_config(runs / "a", {"epochs": 2, "T": 0.2})
    assert rundir.resolve(str(runs), "a", "auto", None) == ("a", True)
    assert rundir.resolve(str(runs), None, "yes", None) == ("a", True)
    rundir.check_config(runs / "a", {"epochs": 2, "T": 0.2})
    with pytest.raises(ConfigError, match="epochs 2 -> 3"):
        rundir.check_config(runs / "a", {"epochs": 3, "T": 0.2})
    rundir.check_config(runs / "a", {"epochs": 3, "T": 0.2}, {"epochs"})

    (runs / "a" / rundir.RAY_SNAPSHOT).write_text('{"torn')
    assert rundir.set_aside_torn_ray_snapshot(runs / "a")
    assert not (runs / "a" / rundir.RAY_SNAPSHOT).exists()
    assert (runs / "a" / (rundir.RAY_SNAPSHOT + ".torn")).read_text() == '{"torn'


def test_export_and_lincls_backbone_from_s3(prefix, tmp_path):
    import torchvision

    ckpt = upload_checkpoint(tmp_path, prefix, 10)
    out = f"{prefix}/exports/encoder.pt"
    assert export.main([prefix, "--out", out]) == 0   # the run directory: its newest valid checkpoint
    model = torchvision.models.resnet18()
    result = model.load_state_dict(torch.load(io.BytesIO(storage.at(out).read_bytes())), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    for source in (str(ckpt), out):   # lincls --pretrained: a checkpoint or an export on s3
        backbone, arch, _ = export.load_backbone(source)
        assert arch == "resnet18" and "conv1.weight" in backbone


def test_report_from_s3(prefix, tmp_path):
    import pandas as pd

    local = tmp_path / "synth"
    records = synthetic_run(local)
    run = storage.at(prefix) / "synth"
    run.upload(local)
    out = report.write_report(str(run))
    assert out == run / "report"
    names = out.listdir()
    assert {"metrics.parquet", "summary.md", *report.PLOTS} <= set(names)
    assert len(pd.read_parquet(io.BytesIO((out / "metrics.parquet").read_bytes()))) == len(records)
    with tempfile.TemporaryDirectory() as tmp:
        out.download(tmp)
        for png in report.PLOTS:
            check_png(os.path.join(tmp, png))
    assert "s3://" in (out / "summary.md").read_text()


def test_sample_log_on_s3_is_durable_at_flush(prefix):
    from moco_ray.sample_log import SampleLog, consumed_per_epoch

    log = SampleLog(prefix, rank=0)
    log.write(0, 0, torch.tensor([1, 2]))
    log.flush()
    assert consumed_per_epoch(prefix) == {0: [1, 2]}
    log.write(0, 1, torch.tensor([3, 4]))
    log.close()
    assert sorted(consumed_per_epoch(prefix)[0]) == [1, 2, 3, 4]


@pytest.fixture
def ray_with_s3(s3, _ray_shutdown_at_end):
    """A local Ray started after the S3 environment is set, so that its workers inherit it (as a
    cluster's workers get credentials from their own environment)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


TIMM_ARCH = "timm:test_resnet"   # timm's smallest test ResNet: a step costs ~1/30 of the demo's resnet18


def test_demo_v3_on_s3_driver_killed_continues_then_lincls_export_report(ray_with_s3, prefix, digits, tmp_path):
    """The v3 demo on a timm backbone, its storage and sample log on s3://: SIGKILL of
    `python -m moco_ray.train` and its local Ray mid-run; the same command again (--resume auto)
    continues from the newest valid checkpoint, every epoch's samples once; then lincls, export and
    report from the same URI. (The v1/v2 continuations: test_train's --resume, test_chaos.)"""
    from conftest import tiny_run_args
    from moco_ray import lincls
    from moco_ray.data import dataset_info
    from moco_ray.progress import read_metrics
    from moco_ray.sample_log import exactly_once_problems

    runs, samples, B, epochs = f"{prefix}/runs", f"{prefix}/samples", 32, 2   # 44 steps an epoch
    run = f"{runs}/r"
    args = ["--config", "demo-v3"] + tiny_run_args(
        digits, runs, "r", "--resume", "auto", "--set", f"arch={TIMM_ARCH}", "--set", "small_stem=false",
        "--set", f"sample_log={samples}", "--set", f"batch_size={B}", "--set", "res=16", "--set", "knn_every=0",
        "--set", "knn_data=", "--set", f"epochs={epochs}", "--set", "warmup_epochs=1",
        "--set", "checkpoint_every_steps=10", "--set", "aug=v3",   # v3's own augmentation pair, end to end
        "--set", "precision=fp32")   # see 'bf16 on the CPU' in conftest.py
    command = [sys.executable, "-m", "moco_ray.train", *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # with the S3 environment
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # Its own session (process group): the kill takes the driver and the local Ray it started.
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            rows = read_metrics(run)
            saved = [r["step"] for r in rows if r.get("checkpoint")]
            if saved and max(r.get("step") or 0 for r in rows) >= saved[-1] + 3:
                break  # steps past the newest checkpoint: the continuation redoes them
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.2)
        else:
            raise AssertionError("no checkpoint within 300 s")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # its session: the driver and its local Ray
        driver.wait()
        log.close()
    # the bucket's records lag the run by up to 5 s (and a worker may finish an upload after the
    # kill): the continuation starts from at least the newest valid checkpoint on the bucket now
    newest_step = checkpoint.verify(checkpoint.newest_valid(run))["step"]

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = read_metrics(run)
    starts = [r for r in rows if r.get("event") == "start"]
    assert starts[0]["step"] == 0 and starts[0]["config"]["arch"] == TIMM_ARCH
    resumed = starts[-1]
    assert resumed["resumed_from"].startswith(f"{run}/checkpoint_") and 0 < newest_step <= resumed["step"]
    assert checkpoint.verify(resumed["resumed_from"])["step"] == resumed["step"]
    n = dataset_info(digits["train"])["n"]
    total = n // B * epochs
    assert rows[-1]["event"] == "end" and rows[-1]["step"] == total and rows[-1]["checkpoint"].startswith("s3://")
    assert checkpoint.verify(checkpoint.newest_valid(run))["step"] == total
    assert rundir.recorded_config(run)["method"] == "v3"
    assert exactly_once_problems(samples, n, B, epochs) == []

    # lincls, export and report from the same URI
    assert lincls.main(["--pretrained", run, "--storage-path", runs, "--name", "lin",
                        "--set", f"data={digits['train']}", "--set", f"val_data={digits['val']}", "--set", "res=16",
                        "--set", "epochs=1", "--set", "eval_every=1", "--set", "random_baseline=false",
                        "--set", "pixel_baseline=false", "--set", "checkpoint_every_steps=1000"]) == 0
    end = read_metrics(f"{runs}/lin")[-1]
    assert end["event"] == "end" and end["lincls_top1"] is not None and end["checkpoint"].startswith("s3://")
    assert export_loads_into_timm(run, f"{runs}/exports/encoder.pt")
    assert report.main([run]) == 0 and (storage.at(run) / "report" / "summary.md").is_file()


def export_loads_into_timm(run, out):
    """`moco_ray.export RUN --format timm` to a URI: the state_dict loads into timm's model, only its
    classifier missing."""
    import timm

    assert export.main([run, "--out", out, "--format", "timm"]) == 0
    model = timm.create_model(TIMM_ARCH[len("timm:"):], pretrained=False, num_classes=10)
    result = model.load_state_dict(torch.load(io.BytesIO(storage.at(out).read_bytes())), strict=False)
    return not result.unexpected_keys and {k.split(".")[0] for k in result.missing_keys} == {"fc"}
