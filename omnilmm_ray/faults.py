"""Fault drills: named points where a test can kill the whole job, and the engine's flight recorder."""

from __future__ import annotations

import hashlib
import os
import signal

from omnilmm_ray.storage import join, read_json, resolve, write_json

KILL_ENV = "OMNILMM_KILL_AT"


def kill_point(name: str) -> None:
    """`OMNILMM_KILL_AT=<name>` SIGKILLs this job's whole process group here (crash drills in tests)."""
    if os.environ.get(KILL_ENV) == name:
        os.killpg(os.getpgid(0), signal.SIGKILL)


class FlightRecorder:
    """Remembers which rows were inside the engine when its actor died.

    Before an engine call the actor writes a record for exactly those rows; after it, the record is
    removed. A record still present when the same rows come back (Ray retries the batch on a restarted
    actor) means the engine died with them in flight. The records live in the run's output location, so
    an actor restarted on any node sees them.
    """

    def __init__(self, run_uri: str, storage_options: dict | None = None):
        self.fs, self.dir = resolve(join(run_uri, "_inflight"), storage_options)

    def _path(self, row_ids: list[str]) -> str:
        return join(self.dir, hashlib.sha1("\n".join(row_ids).encode()).hexdigest()[:32] + ".json")

    def begin(self, row_ids: list[str]) -> int:
        """Record the rows as in flight; returns how many engines already died with exactly these rows."""
        path = self._path(row_ids)
        prev = read_json(self.fs, path)
        deaths = prev["deaths"] + 1 if prev else 0
        write_json(self.fs, path, {"deaths": deaths, "rows": row_ids[:8]})
        return deaths

    def end(self, row_ids: list[str]) -> None:
        try:
            self.fs.rm_file(self._path(row_ids))
        except FileNotFoundError:
            pass
