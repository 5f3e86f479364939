"""A lease on the output location, so two jobs never write the same table at once.

Object stores have no portable create-if-absent, so this is a heartbeat lease: the holder rewrites
`_lock.json` every ttl/4; a lease is free when its heartbeat is older than the TTL, or when its holder ran
on this host and its process is gone (so a rerun after `kill -9` starts at once). After writing, the
taker waits briefly and reads the lease back: of two jobs racing, the one that was overwritten refuses.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from omnilmm_ray.storage import join, read_json, resolve, write_json


class LeaseHeld(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(
        self, output_uri: str, ttl_s: float, storage_options: dict | None = None, settle_s: float = 0.5
    ):
        self.fs, base = resolve(output_uri, storage_options)
        self.path = join(base, "_lock.json")
        self.uri = join(output_uri, "_lock.json")
        self.ttl_s, self.settle_s = ttl_s, settle_s
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _free(self, cur: dict | None) -> bool:
        if not cur or cur.get("owner") == self.me["owner"]:
            return True
        if time.time() - float(cur.get("heartbeat", 0)) > self.ttl_s:
            return True
        return cur.get("host") == self.me["host"] and not _pid_alive(int(cur.get("pid", -1)))

    def _write(self) -> None:
        write_json(self.fs, self.path, {**self.me, "heartbeat": time.time()})

    def check(self) -> None:
        """Read-only peek, so a job can refuse before starting Ray: raises LeaseHeld when a live holder has
        the output. A lease `acquire` would wait out or take over passes; `acquire` still decides."""
        cur = read_json(self.fs, self.path)
        if cur and not self._free(cur) and time.time() - float(cur.get("heartbeat", 0)) <= self.ttl_s / 2:
            raise LeaseHeld(
                f"output is in use: another job (host {cur.get('host')}, pid {cur.get('pid')}) holds "
                f"{self.uri}; wait for it to finish, or delete the lock file if that job is gone"
            )

    def acquire(self) -> Lease:
        cur = read_json(self.fs, self.path)
        age = time.time() - float(cur.get("heartbeat", 0)) if cur else 0.0
        if not self._free(cur) and age > self.ttl_s / 2:
            # Its holder missed two heartbeats: most likely dead on another host (a preempted head pod).
            # Wait out the TTL instead of failing, so an automatic retry of the job goes through.
            time.sleep(self.ttl_s - age + 0.1)
            cur = read_json(self.fs, self.path)
        if not self._free(cur):
            age = time.time() - float(cur.get("heartbeat", 0))
            raise LeaseHeld(
                f"output is in use: another job (host {cur.get('host')}, pid {cur.get('pid')}) holds {self.uri} "
                f"(heartbeat {age:.0f}s ago, expires after {self.ttl_s:.0f}s). Wait for it to finish, or delete "
                "the lock file if that job is gone."
            )
        self._write()
        time.sleep(self.settle_s)
        cur = read_json(self.fs, self.path)
        if not cur or cur.get("owner") != self.me["owner"]:
            raise LeaseHeld(f"output is in use: another job took {self.uri} at the same moment")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="omnilmm-lease")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._write()
            except Exception:  # a missed heartbeat is retried at the next tick; the TTL has slack for it
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        cur = read_json(self.fs, self.path)
        if cur and cur.get("owner") == self.me["owner"]:
            self.fs.rm_file(self.path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
