"""Where a lease lives, and the one atomic step each store offers for it (lease.py decides when a lease is
free and keeps it): a compare-and-swap under a bounded `flock` on a local filesystem, conditional PUTs on
S3 (`If-None-Match: *` / `If-Match: <ETag>`), and elsewhere a plain write the caller reads back."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from contextlib import contextmanager

from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem

from omnilmm_ray.storage import TMP_PREFIX, join, read_json, write_json

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
