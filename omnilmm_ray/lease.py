"""A lease on the output location, so two jobs never write the same table at once.

`_lock.json` names its holder and a heartbeat time that the holder rewrites every ttl/4. Taking the lease is
atomic where the store has conditional writes: a compare-and-swap under `flock` on a local filesystem,
`If-None-Match: *` to create and `If-Match: <ETag>` to take over or renew on S3. Other stores (GCS, Azure
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

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from omnilmm_ray.storage import join, read_json, resolve, write_json


class LeaseHeld(RuntimeError):
    pass


class LeaseLost(RuntimeError):
    pass


class _Taken(Exception):
    """A conditional write lost: someone else wrote the lease since we read it."""


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


class _Store:
    """Portable: plain overwrites; the caller's read-back settles races."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[dict | None, object]:
        cur = read_json(self.fs, self.path)
        return cur, cur

    def create(self, body: dict) -> object:
        write_json(self.fs, self.path, body)
        return body

    def take(self, body: dict, token: object) -> object:
        return self.create(body)

    def renew(self, body: dict, token: object) -> object:
        return self.create(body)


class _LocalStore(_Store):
    """Compare-and-swap under an advisory lock (`flock`) on the output folder, which the kernel drops when
    its holder dies, so it never goes stale; creating is also an exclusive create (a hard link)."""

    @contextmanager
    def _swap(self, token: object):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if read_json(self.fs, self.path) != token:
                raise _Taken()
            yield
        finally:
            os.close(fd)

    def create(self, body: dict) -> object:
        with self._swap(None):
            tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "w") as f:
                json.dump(body, f)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise _Taken() from None
            finally:
                os.unlink(tmp)
        return body

    def take(self, body: dict, token: object) -> object:
        with self._swap(token):
            write_json(self.fs, self.path, body)
        return body

    renew = take


class _S3Store(_Store):
    """PutObject with `If-None-Match: *` (create) and `If-Match: <ETag>` (takeover, heartbeat)."""

    def __init__(self, fs, path: str):
        super().__init__(fs, path)
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[dict | None, object]:
        async def get():
            r = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            return await r["Body"].read(), r["ETag"]

        import aiohttp

        for attempt in range(5):
            try:
                data, etag = sync(self.fs.loop, get)
                return json.loads(data), etag
            except FileNotFoundError:
                return None, None
            except (aiohttp.ClientError, ConnectionError, TimeoutError):
                # s3fs retries the request, not a body cut off mid-read (what s3fs's own cat_file retries)
                if attempt == 4:
                    raise
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    def _put(self, body: dict, **cond) -> object:
        try:
            return self.fs.pipe_file(self.path, json.dumps(body).encode(), **cond)["ETag"]
        except FileExistsError:
            raise _Taken() from None
        except OSError as e:  # 412 Precondition Failed / 409 ConditionalRequestConflict
            code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise _Taken() from None
            raise

    def create(self, body: dict) -> object:
        return self._put(body, mode="create")

    def take(self, body: dict, token: object) -> object:
        return self._put(body, IfMatch=token)

    def renew(self, body: dict, token: object) -> object:
        return self._put(body, IfMatch=token)


def _store(fs, path: str) -> _Store:
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(fs, path)
    if "s3" in fs.protocol:
        return _S3Store(fs, path)
    return _Store(fs, path)


class Lease:
    def __init__(
        self, output_uri: str, ttl_s: float, storage_options: dict | None = None, settle_s: float = 0.5
    ):
        self.fs, base = resolve(output_uri, storage_options)
        self.path = join(base, "_lock.json")
        self.store = _store(self.fs, self.path)
        self.output_uri = output_uri
        self.uri = join(output_uri, "_lock.json")
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
