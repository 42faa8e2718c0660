"""The resources a killed driver's run still holds reserved, released when the run resumes.

An elastic Ray Train run (`--num-workers MIN:MAX`) reserves its workers' resources at Ray's
AutoscalingCoordinator, a detached actor that outlives the driver, under the requester id
"train-<run id>". The controller cancels the reservation when the run ends. When the driver is
killed it cannot, and the reservation stays until it expires (180 s in Ray 2.60): the next driver
of the same run gets no workers until then. bench/chaos.py measured about 210 s from each
driver_kill to the next step.

So the controller records each Ray Train run id with the Ray job of its driver in
RUN_DIR/ray_train_run.json (`remember`), and a driver that resumes the run cancels the reservation
of a recorded run whose job is dead (`release_stale`). Ray has no public API for either step; the
calls used here are Ray 2.60's (pinned), and a failure only costs the wait above.
"""
import json

import ray

from moco_ray import storage

FILE = "ray_train_run.json"
COORDINATOR = "AutoscalingCoordinator"   # the actor's name and its namespace


def remember(run_dir, run_id, job_id):
    """Records the run id with its driver's job in RUN_DIR (a path or URI): one small write."""
    (storage.at(run_dir) / FILE).write_text(json.dumps({"run_id": run_id, "job_id": job_id}))


def release_stale(run_dir, timeout_s=10.0):
    """Cancels the reservation of the run recorded in run_dir if its driver's job is dead.
    Returns the requester id cancelled, or None."""
    path = storage.at(run_dir) / FILE
    try:
        seen = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if job_alive(seen["job_id"]):
        return None
    path.delete()
    try:
        coordinator = ray.get_actor(COORDINATOR, namespace=COORDINATOR)
    except ValueError:   # no elastic run has started on this cluster
        return None
    requester = f"train-{seen['run_id']}"
    ray.get(coordinator.cancel_request.remote(requester_id=requester), timeout=timeout_s)
    return requester


def job_alive(job_id):
    from ray._private.state import jobs

    return any(j["JobID"] == job_id and not j["IsDead"] for j in jobs())
