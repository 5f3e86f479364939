"""The local lease's folder lock: a holder that never lets go (stopped, hung) fails the next job clearly."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from omnilmm_ray.lease import Lease, LeaseHeld, identity

# A process that takes the output folder's lock (as a heartbeat does around its write) and stops there.
HOLD_AND_STOP = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.fixture
def stopped_holder(tmp_path):
    """The output's lease holder, stopped while holding the folder lock, and its lease expired since."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_STOP, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "locked"
        me = identity()
        lease = {**me, "owner": "x", "pid": p.pid, "host": "holder-host", "heartbeat": time.time() - 3600}
        (tmp_path / "_lock.json").write_text(json.dumps(lease))
        yield p
    finally:
        p.kill()
        p.wait()


def _acquire_in_thread(lease: Lease, bound_s: float):
    """acquire() run in a thread, so a wait without end fails the test instead of hanging it."""
    got: list = []

    def go():
        try:
            got.append(lease.acquire())
        except BaseException as e:  # noqa: BLE001 - the test inspects whatever it raised
            got.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(bound_s)
    assert not t.is_alive(), f"acquire() still waiting for the folder lock after {bound_s}s"
    return got[0]


def test_a_stopped_holder_of_the_folder_lock_fails_the_next_job_with_lease_held(
    tmp_path, stopped_holder, caplog
):
    caplog.set_level(logging.WARNING, logger="omnilmm_ray.lease")
    got = _acquire_in_thread(Lease(str(tmp_path), ttl_s=60, settle_s=0, lock_wait_s=2), bound_s=60)
    assert isinstance(got, LeaseHeld), got
    msg = str(got)
    assert f"the lock on folder {tmp_path}" in msg and "not released within 2s" in msg
    assert f"host holder-host pid {stopped_holder.pid}" in msg and "resume or end it" in msg
    waited = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert waited and str(tmp_path) in waited[0] and f"pid {stopped_holder.pid}" in waited[0], waited
    assert json.loads((tmp_path / "_lock.json").read_text())["owner"] == "x"  # nothing written


def test_once_the_stopped_holder_is_gone_the_lease_is_taken(tmp_path, stopped_holder):
    stopped_holder.kill()
    stopped_holder.wait()  # the kernel drops its lock with the process
    lease = _acquire_in_thread(Lease(str(tmp_path), ttl_s=60, settle_s=0, lock_wait_s=2), bound_s=60)
    assert isinstance(lease, Lease), lease
    assert json.loads((tmp_path / "_lock.json").read_text())["owner"] == lease.me["owner"]
    lease.release()


def test_a_heartbeat_that_cannot_take_the_lock_misses_a_beat_without_waiting_forever(tmp_path):
    lease = Lease(str(tmp_path), ttl_s=600, settle_s=0, lock_wait_s=1).acquire()
    lease._stop.set()  # heartbeats driven by the test
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_STOP, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "locked"
        got: list = []

        def beat():
            try:
                lease._check(renew=True)
                got.append(None)
            except LeaseHeld as e:
                got.append(e)

        t = threading.Thread(target=beat, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "a heartbeat waited for the folder lock without end"
        assert isinstance(got[0], LeaseHeld), got
        assert lease.lost is None  # a missed heartbeat (the next one is retried), not a lost lease
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    lease._check(renew=True)
    lease.release()


def test_leftover_temporary_lock_files_are_removed_by_the_next_acquire(tmp_path):
    (tmp_path / ".tmp-0123-_lock.json").write_text("{")  # a kill inside a lock write
    (tmp_path / "_lock.json.4567.tmp").write_text("{")  # the same, named as before TMP_PREFIX
    (tmp_path / ".tmp-89ab-_plan.json").write_text("{")  # not the lease's: table.py's to remove
    with Lease(str(tmp_path), ttl_s=600, settle_s=0):
        left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".tmp-89ab-_plan.json", "_lock.json"], left
