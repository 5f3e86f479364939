"""A lease on the output location, so two jobs never write the same table at once.

`_lock.json` names its holder and a heartbeat time that the holder rewrites every ttl/4. Taking the lease is
atomic where the store has conditional writes: a compare-and-swap under `flock` on a local filesystem,
`If-None-Match: *` to create and `If-Match: <ETag>` to take over or renew on S3. The local lock is waited
for at most `lock_wait_s`: a process stopped while holding it (SIGSTOP, a frozen container) would otherwise
block every other job without end; a lease that cannot be checked in time counts as held. Other stores (GCS, Azure
through fsspec) get the portable fallback: write, wait briefly, read back; of two jobs racing, the one that
was overwritten refuses. The read-back also runs after a conditional write, for S3-compatible stores that
ignore the condition headers.

A lease is free when its heartbeat is older than the TTL, or when its holder ran on this machine (same boot
id) in this PID namespace and its process is gone, so a rerun after `kill -9` starts at once. Containers
share a hostname across PID namespaces, so the hostname alone never proves a holder dead.

Every heartbeat reads the lease back. A holder that finds another job's lease (or none) has lost it: it
stops heartbeating, and `ensure()`, which the job calls before each write, raises `LeaseLost`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from omnilmm_ray.lease_store import (  # noqa: F401  (LeaseHeld, LeaseLost, _Taken: imported from here)
    LOCK_WAIT_S,
    LeaseHeld,
    LeaseLost,
    _store,
    _Taken,
)
from omnilmm_ray.storage import join, read_json, resolve

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def identity() -> dict:
    """Who holds a lease: a PID means something only with the same boot id and the same PID namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc (macOS): the heartbeat age alone decides
        boot_id, pid_ns = None, None
    return {"host": socket.gethostname(), "boot_id": boot_id, "pid_ns": pid_ns, "pid": os.getpid()}


class Lease:
    def __init__(
        self,
        output_uri: str,
        ttl_s: float,
        storage_options: dict | None = None,
        settle_s: float = 0.5,
        lock_wait_s: float | None = None,
    ):
        """`lock_wait_s`: the longest wait for the local folder lock (default: a heartbeat interval, at
        least LOCK_WAIT_S), after which the lease counts as held."""
        self.fs, base = resolve(output_uri, storage_options)
        self.path = join(base, "_lock.json")
        self.output_uri = output_uri
        self.uri = join(output_uri, "_lock.json")
        wait = lock_wait_s if lock_wait_s is not None else max(LOCK_WAIT_S, ttl_s / 4)
        self.store = _store(self.fs, self.path, wait, self.uri)
        self.ttl_s, self.settle_s = ttl_s, settle_s
        self.me = {"owner": uuid.uuid4().hex, **identity()}
        self.lost: dict | None = None  # the lease found in our place once we lost ours ({} if none)
        self._token: object = None
        self._verified = 0.0  # time.monotonic() of the last heartbeat that found the lease ours
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _free(self, cur: dict | None) -> bool:
        if not cur or cur.get("owner") == self.me["owner"]:
            return True
        if time.time() - float(cur.get("heartbeat", 0)) > self.ttl_s:
            return True
        same_space = cur.get("boot_id") and (cur.get("boot_id"), cur.get("pid_ns")) == (
            self.me["boot_id"],
            self.me["pid_ns"],
        )
        return bool(same_space) and not _pid_alive(int(cur.get("pid", -1)))

    def _body(self) -> dict:
        return {**self.me, "heartbeat": time.time()}

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
        cur, token = self.store.read()
        age = time.time() - float(cur.get("heartbeat", 0)) if cur else 0.0
        if not self._free(cur) and age > self.ttl_s / 2:
            # Its holder missed two heartbeats: most likely dead on another host (a preempted head pod).
            # Wait out the TTL instead of failing, so an automatic retry of the job goes through.
            log.warning(
                "%s is held by host %s pid %s, whose last heartbeat was %.0fs ago: waiting %.0fs for it to "
                "expire (sink.lock_ttl_s)",
                self.uri,
                cur.get("host"),
                cur.get("pid"),
                age,
                self.ttl_s - age,
            )
            time.sleep(self.ttl_s - age + 0.1)
            cur, token = self.store.read()
        if not self._free(cur):
            age = time.time() - float(cur.get("heartbeat", 0))
            raise LeaseHeld(
                f"output is in use: another job (host {cur.get('host')}, pid {cur.get('pid')}) holds {self.uri} "
                f"(heartbeat {age:.0f}s ago, expires after {self.ttl_s:.0f}s). Wait for it to finish, or delete "
                "the lock file if that job is gone."
            )
        started = time.monotonic()
        try:
            self._token = (
                self.store.create(self._body()) if cur is None else self.store.take(self._body(), token)
            )
        except _Taken:
            raise LeaseHeld(f"output is in use: another job took {self.uri} at the same moment") from None
        time.sleep(self.settle_s)
        cur, self._token = self.store.read()
        if not cur or cur.get("owner") != self.me["owner"]:
            raise LeaseHeld(f"output is in use: another job took {self.uri} at the same moment")
        self._verified = started
        self._thread = threading.Thread(target=self._beat, daemon=True, name="omnilmm-lease")
        self._thread.start()
        return self

    def _check(self, renew: bool) -> None:
        """Read the lease back; if it is still ours, optionally renew it (conditionally where possible)."""
        with self._lock:
            if self.lost is not None:
                return
            started = time.monotonic()
            cur, token = self.store.read()
            if not cur or cur.get("owner") != self.me["owner"]:
                self.lost = cur or {}
                return
            if renew:
                try:
                    token = self.store.renew(self._body(), token)
                except _Taken:
                    self.lost = self.store.read()[0] or {}
                    return
            self._token, self._verified = token, started

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._check(renew=True)
            except Exception:  # a missed heartbeat is retried at the next tick; the TTL has slack for it
                pass
            if self.lost is not None:
                return

    def ensure(self) -> None:
        """Raise LeaseLost unless this job still holds the lease; call it right before each write.

        A heartbeat that found the lease ours less than ttl/2 ago proves that nobody took it over since
        (a taker waits for a heartbeat older than the TTL), so most calls cost nothing; after a longer gap
        (the process was paused, the store was slow) the lease is read back first. What remains: a pause
        between this check and the write itself, which the commit-time checks of the new holder catch.
        """
        if self.lost is None and time.monotonic() - self._verified > self.ttl_s / 2:
            self._check(renew=False)
        if self.lost is not None:
            other = self.lost
            by = (
                f"to host {other.get('host')} pid {other.get('pid')}"
                if other
                else "(its lock file is gone: a later job took it over and finished)"
            )
            raise LeaseLost(
                f"lost the lease on {self.output_uri} {by}; another job took over after sink.lock_ttl_s="
                f"{self.ttl_s:g}s without a heartbeat from this one; this job stops without writing"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.lost is not None:
            return
        cur = read_json(self.fs, self.path)
        if cur and cur.get("owner") == self.me["owner"]:
            self.fs.rm_file(self.path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
