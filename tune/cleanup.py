"""Releases the worker placement groups that ended trials leave behind.

A Ray Train V2 run reserves its workers with a placement group created by its controller actor. When
ASHA stops a trial, Tune ends the trial's actor, the controller (which that actor owns) dies with it,
and the placement group, whose lifetime belongs to the job and not to the actor, keeps its resources
until the sweep's driver exits: the next trials then wait for resources that never come back. The
same happens, as a race, when a trial finishes: Tune ends its actor as soon as the trainable returns,
sometimes before the controller has removed its placement group. Ray
Train starts a detached PlacementGroupCleaner for this case, but it watches the controller through
the State API, which needs the dashboard and a host with one Ray instance; without them it dies and
the placement group leaks. So the sweep's driver also releases them itself: a placement group of
this job, created by an actor that is now dead, is one no one can use any more.
"""
import logging
import time

from ray.tune import Callback

log = logging.getLogger("tune.sweep")


def _table():
    """(placement group id, raw GCS row) of every placement group (private API; [] if it moved)."""
    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        accessor = state._connect_and_get_accessor()
        rows = [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table()]
        return rows, gcs_pb2.PlacementGroupTableData.REMOVED
    except Exception as e:  # noqa: BLE001 - best effort: Ray's own cleaner may still do it
        log.debug("cannot read the placement group table: %s", e)
        return [], None


def actor_placement_groups(since_ms=0):
    """Live placement groups that actors of this job created since `since_ms`: {id hex: creator dead}."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    rows, removed = _table()
    nil = b"\xff" * 16
    out = {}
    for pg in rows:
        if pg.state == removed or pg.is_detached or pg.creator_job_id.hex() != job:
            continue
        if not pg.creator_actor_id or pg.creator_actor_id == nil or not pg.creator_actor_id.strip(b"\xff"):
            continue   # created by the driver itself (Tune's trial resources): never ours to remove
        if pg.placement_group_creation_timestamp_ms and pg.placement_group_creation_timestamp_ms < since_ms:
            continue
        out[pg.placement_group_id.hex()] = pg.creator_actor_dead
    return out


def release_orphans(since_ms=0):
    """Removes the live placement groups of this job whose creating actor is dead. Returns their ids."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray._raylet import PlacementGroupID

    released = []
    for pg_id, dead in actor_placement_groups(since_ms).items():
        if not dead:
            continue
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            released.append(pg_id)
        except Exception as e:  # noqa: BLE001
            log.warning("could not remove orphaned placement group %s: %s", pg_id, e)
    if released:
        print(f"[sweep] released {len(released)} placement group(s) left by ended trials", flush=True)
    return released


def release_at_end(since_ms, timeout_s=30.0):
    """After the sweep: wait for the controllers of stopped trials to die, then release their groups."""
    deadline = time.monotonic() + timeout_s
    while True:
        release_orphans(since_ms)
        if not actor_placement_groups(since_ms) or time.monotonic() > deadline:
            return
        time.sleep(1.0)


class ReleaseOrphanedPlacementGroups(Callback):
    """Every few seconds of the Tune loop, release what stopped trials left behind."""

    def __init__(self, since_ms, interval_s=5.0):
        self.since_ms = since_ms
        self.interval_s = interval_s
        self._last = 0.0

    def setup(self, **info):
        self._last = 0.0     # monotonic clocks differ between processes (Tuner.restore)

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            release_orphans(self.since_ms)
