"""A killed driver's reservation at Ray's AutoscalingCoordinator, released when its run resumes
(moco_ray.reservation), on the session's real local Ray (2 CPUs) and Ray's own coordinator actor."""
import pytest

from moco_ray import reservation


@pytest.fixture
def coordinator(ray_session):
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    actor = get_or_create_autoscaling_coordinator()
    yield actor
    for requester in ("train-dead", "train-new", "train-alive"):   # nothing left for later tests
        ray_session.get(actor.cancel_request.remote(requester_id=requester))


def reserve(ray, coordinator, requester):
    """Asks for the 2 CPUs of this Ray as Ray Train's elastic policy does; returns the CPUs granted."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import ResourceRequestPriority

    ray.get(coordinator.request_resources.remote(requester_id=requester, resources=[{"CPU": 1}] * 2,
                                                 expire_after_s=180, priority=ResourceRequestPriority.HIGH))
    return cpus(ray, coordinator, requester)


def cpus(ray, coordinator, requester):
    granted = ray.get(coordinator.get_reserved_resources.remote(requester, recompute=True))
    return sum(node.get("CPU", 0) for node in granted.values())


def test_a_dead_drivers_reservation_is_released_for_the_next_run(ray_session, coordinator, tmp_path):
    ray = ray_session
    assert reserve(ray, coordinator, "train-dead") == 2
    assert reserve(ray, coordinator, "train-new") == 0      # the dead run's CPUs, for 180 s
    reservation.remember(tmp_path, "dead", "ffffffff")        # a job id the cluster never had
    assert reservation.release_stale(tmp_path) == "train-dead"
    assert cpus(ray, coordinator, "train-new") == 2
    assert not (tmp_path / reservation.FILE).exists()
    assert reservation.release_stale(tmp_path) is None       # nothing recorded any more


def test_a_live_drivers_reservation_is_kept(ray_session, coordinator, tmp_path):
    ray = ray_session
    assert reserve(ray, coordinator, "train-alive") == 2
    reservation.remember(tmp_path, "alive", ray.get_runtime_context().get_job_id())
    assert reservation.job_alive(ray.get_runtime_context().get_job_id())
    assert reservation.release_stale(tmp_path) is None
    assert cpus(ray, coordinator, "train-alive") == 2
