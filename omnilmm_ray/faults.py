"""Fault drills: named points where a test can kill the whole job, and the engine's flight recorder."""

from __future__ import annotations

import hashlib
import json
import os
import signal

KILL_ENV = "OMNILMM_KILL_AT"
FLIGHT_NAMESPACE = "omnilmm_flight"


def kill_point(name: str) -> None:
    """`OMNILMM_KILL_AT=<name>` SIGKILLs this job's whole process group here (crash drills in tests)."""
    if os.environ.get(KILL_ENV) == name:
        os.killpg(os.getpgid(0), signal.SIGKILL)


class _RayKV:
    """Ray's cluster-wide key-value store in the GCS: reachable from an actor restarted on any node, a
    sub-millisecond RPC instead of an object-store request, and gone with the cluster. Ray's own libraries
    keep their state there; the functions are `ray.experimental.internal_kv`'s (not a stable public API)."""

    def __init__(self):
        from ray.experimental import internal_kv

        self.kv = internal_kv

    def put(self, key: str, value: bytes) -> None:
        self.kv._internal_kv_put(key, value, namespace=FLIGHT_NAMESPACE)

    def get(self, key: str) -> bytes | None:
        return self.kv._internal_kv_get(key, namespace=FLIGHT_NAMESPACE)

    def delete(self, key: str, by_prefix: bool = False) -> None:
        self.kv._internal_kv_del(key, del_by_prefix=by_prefix, namespace=FLIGHT_NAMESPACE)

    def keys(self, prefix: str) -> list[str]:
        return [k.decode() for k in self.kv._internal_kv_list(prefix, namespace=FLIGHT_NAMESPACE)]


class _LocalKV(dict):
    """The same store for a stage called directly, without Ray (unit tests): one process, no restarts."""

    def put(self, key: str, value: bytes) -> None:
        self[key] = value

    def delete(self, key: str, by_prefix: bool = False) -> None:
        for k in [k for k in self if (k.startswith(key) if by_prefix else k == key)]:
            del self[k]

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self if k.startswith(prefix)]


def _ray_context():
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency; kept for a stage used without it
        return None
    return ray.get_runtime_context() if ray.is_initialized() else None


def attempt_id() -> str:
    """This attempt of the job: the Ray job (driver) id, unique within a cluster for its whole life.

    A resumed run is a new driver, hence a new attempt: records of a job that was killed never count.
    """
    ctx = _ray_context()
    return ctx.get_job_id() if ctx else "local"


def clear_flight_records() -> None:
    """Called by the driver when its pipeline is over: drop this attempt's records from the cluster."""
    if _ray_context():
        _RayKV().delete(f"{attempt_id()}/", by_prefix=True)


def flight_records(attempt: str) -> dict[str, dict]:
    """An attempt's batches now inside an engine (key -> record); for drills and diagnosis."""
    kv = _RayKV()
    return {k: json.loads(kv.get(k) or b"{}") for k in kv.keys(f"{attempt}/inflight/")}


class FlightRecorder:
    """Remembers which rows were inside the engine when its actor died, within this attempt of the job.

    Before an engine call the actor records the rows under its actor id; after it, the record is removed
    (two GCS key-value writes per batch, no object-store request). An actor that Ray restarted after a
    death finds the records it left, counts one engine death for each of those exact row sets, and from
    then on looks up the count of every batch it gets (Ray retries the dead actor's batches on the same,
    restarted actor). Records are keyed by the attempt (the driver's Ray job id), so an engine killed
    together with the whole job never counts as an engine death in the resumed run.
    """

    def __init__(self):
        ctx = _ray_context()
        self.kv = _RayKV() if ctx else _LocalKV()
        self.prefix = f"{attempt_id()}/"
        actor = ctx.get_actor_id() if ctx else None
        self.inflight = f"{self.prefix}inflight/{actor or os.getpid()}/"
        self.died_before = bool(actor and ctx.was_current_actor_reconstructed)
        if self.died_before:
            for key in self.kv.keys(self.inflight):
                h = key.rsplit("/", 1)[-1]
                self.kv.put(self._deaths_key(h), str(self._deaths(h) + 1).encode())
                self.kv.delete(key)

    @staticmethod
    def _hash(row_ids: list[str]) -> str:
        return hashlib.sha1("\n".join(row_ids).encode()).hexdigest()[:32]

    def _deaths_key(self, h: str) -> str:
        return f"{self.prefix}deaths/{h}"

    def _deaths(self, h: str) -> int:
        v = self.kv.get(self._deaths_key(h))
        return int(v) if v else 0

    def begin(self, row_ids: list[str]) -> int:
        """Record the rows as in flight; returns how many engines died with exactly these rows in flight,
        in this attempt. An actor that never died looks nothing up: no engine died on its batches."""
        h = self._hash(row_ids)
        self.kv.put(self.inflight + h, json.dumps({"rows": row_ids[:8], "n": len(row_ids)}).encode())
        return self._deaths(h) if self.died_before else 0

    def end(self, row_ids: list[str]) -> None:
        self.kv.delete(self.inflight + self._hash(row_ids))
