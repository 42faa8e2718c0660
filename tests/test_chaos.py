"""Faults in series (bench/chaos.py, reduced): a worker killed, a node removed, a node added, a
worker killed during a checkpoint save, one after the other in one elastic run on a multi-node
ray.cluster_utils.Cluster; the run finishes every planned step, each sample once per epoch."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_four_faults_in_series(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "chaos.py"), "--schedule",
               "worker_kill,node_remove,node_add,save_kill", "--epochs", "2", "--seed", "0",
               "--out", str(tmp_path / "run"), "--json", str(tmp_path / "chaos.json")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Its own session: on a timeout, the bench, its cluster and its driver go together.
    bench = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = bench.communicate(timeout=1200)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    assert (tmp_path / "chaos.json").is_file(), out[-4000:]
    report = json.loads((tmp_path / "chaos.json").read_text())
    rows, summary = report["rows"], report["summary"]
    assert [r["kind"] for r in rows] == ["worker_kill", "node_remove", "node_add", "save_kill"], out[-4000:]
    assert bench.returncode == 0, out[-4000:]
    assert summary["finished"] and summary["final_step"] == summary["planned_steps"]
    assert summary["faults_survived"] == 4
    assert summary["exactly_once_problems"] == [] and summary["queue_problems"] == []
    assert summary["queue_checkpoints_checked"] >= 1
    # seed 0: the removal comes 3.9 s after the kill, while the group restarts; the two may share
    # one restart, the save kill has one of its own
    assert sum(r["restarts"] for r in rows) >= 2 and rows[-1]["restarts"] >= 1, rows
