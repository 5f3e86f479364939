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

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from omnilmm_ray.storage import TMP_PREFIX, join, read_json, resolve, write_json

log = logging.getLogger(__name__)


# The shortest wait for the local folder lock: a write and fsync of a few hundred bytes, on a busy or network
# disk, can take seconds; a lock held longer than this and a heartbeat interval belongs to a stuck process.
LOCK_WAIT_S = 10.0


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

    def __init__(self, fs, path: str, wait_s: float, uri: str):
        super().__init__(fs, path)
        self.wait_s, self.uri = wait_s, uri

    def _holder(self) -> str:
        cur = read_json(self.fs, self.path)
        if not cur:
            return "no job holds the lease"
        age = time.time() - float(cur.get("heartbeat", 0))
        return f"the lease names host {cur.get('host')} pid {cur.get('pid')}, heartbeat {age:.0f}s ago"

    def _flock(self, fd: int, folder: str) -> None:
        """Take the folder lock within `wait_s`, saying what we wait for. A read and a small write hold it
        for milliseconds; longer, its holder is stopped or hung, and a blocking flock would wait for it
        without end."""
        deadline = time.monotonic() + self.wait_s
        said, delay = False, 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise LeaseHeld(
                    f"output is in use: the lock on folder {folder} (held around each read-and-write of "
                    f"{self.uri}) was not released within {self.wait_s:g}s; {self._holder()}. That process "
                    "(or another job taking the lease) is most likely stopped (SIGSTOP, a frozen container) "
                    "or hung: resume or end it (`lsof` on the folder shows it), then rerun"
                )
            if not said and self.wait_s - left >= min(1.0, self.wait_s / 2):
                said = True
                log.warning(
                    "waiting up to %.0fs more for the lock on folder %s, held by another process (%s)",
                    left,
                    folder,
                    self._holder(),
                )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.25)

    @contextmanager
    def _swap(self, token: object, tidy: bool = False):
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            self._flock(fd, folder)
            if tidy:
                self._remove_leftovers(folder)
            if read_json(self.fs, self.path) != token:
                raise _Taken()
            yield
        finally:
            os.close(fd)

    def _remove_leftovers(self, folder: str) -> None:
        """Temporary lock files of a write that a kill interrupted: every write of the lock file happens
        under the folder lock, which we hold, so any one found now is a leftover (table.py removes the
        other temporary files, but not these: it does not take this lock)."""
        name = os.path.basename(self.path)
        for n in os.listdir(folder):
            if (n.startswith(TMP_PREFIX) and n.endswith(f"-{name}")) or (
                n.startswith(f"{name}.") and n.endswith(".tmp")  # named so before the TMP_PREFIX names
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(join(folder, n))

    def create(self, body: dict) -> object:
        with self._swap(None, tidy=True):
            folder, name = os.path.split(self.path)
            tmp = join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
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
        with self._swap(token, tidy=True):
            write_json(self.fs, self.path, body)
        return body

    def renew(self, body: dict, token: object) -> object:
        with self._swap(token):
            write_json(self.fs, self.path, body)
        return body


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


def _store(fs, path: str, lock_wait_s: float, uri: str) -> _Store:
    if isinstance(fs, LocalFileSystem):
        return _LocalStore(fs, path, lock_wait_s, uri)
    if "s3" in fs.protocol:
        return _S3Store(fs, path)
    return _Store(fs, path)


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
