"""The output lease: refuse a live holder, take over a dead one."""

import json
import threading
import time

import pytest

from omnilmm_ray.lease import Lease, LeaseHeld, LeaseLost, identity


def _hold(tmp_path, host, pid, age, **ident):
    (tmp_path / "_lock.json").write_text(
        json.dumps({**ident, "owner": "x", "host": host, "pid": pid, "heartbeat": time.time() - age})
    )


def test_live_holder_on_another_host_is_refused_at_once(tmp_path):
    _hold(tmp_path, "other-host", 1, age=0)
    t0 = time.time()
    with pytest.raises(LeaseHeld, match="host other-host"):
        Lease(str(tmp_path), ttl_s=30, settle_s=0).acquire()
    assert time.time() - t0 < 5


def test_silent_holder_on_another_host_is_waited_out(tmp_path):
    _hold(tmp_path, "other-host", 1, age=1.5)
    lease = Lease(str(tmp_path), ttl_s=2, settle_s=0).acquire()
    assert json.loads((tmp_path / "_lock.json").read_text())["owner"] == lease.me["owner"]
    lease.release()
    assert not (tmp_path / "_lock.json").exists()


def test_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    me = identity()
    _hold(tmp_path, socket.gethostname(), int(dead.stdout), age=0, boot_id=me["boot_id"], pid_ns=me["pid_ns"])
    with Lease(str(tmp_path), ttl_s=600, settle_s=0) as lease:
        assert json.loads((tmp_path / "_lock.json").read_text())["owner"] == lease.me["owner"]


def test_a_same_hostname_in_another_pid_namespace_is_not_taken_over(tmp_path):
    """Containers share a hostname across PID namespaces: a PID there says nothing about a process here."""
    import socket
    import subprocess
    import sys

    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout
    )
    me = identity()
    (tmp_path / "_lock.json").write_text(
        json.dumps(
            {
                **me,
                "owner": "x",
                "host": socket.gethostname(),
                "pid": dead,
                "pid_ns": -1,
                "heartbeat": time.time(),
            }
        )
    )
    with pytest.raises(LeaseHeld, match="output is in use"):
        Lease(str(tmp_path), ttl_s=600, settle_s=0).acquire()


def _race(uri, n=8):
    """n jobs try to take the same free (or stale) lease at once; returns how many got it."""
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(n)

    def take(_):
        lease = Lease(uri, ttl_s=600, settle_s=0)
        barrier.wait()
        try:
            lease.acquire()
        except LeaseHeld:
            return None
        lease._stop.set()
        return lease.me["owner"]

    with ThreadPoolExecutor(n) as pool:
        return [o for o in pool.map(take, range(n)) if o]


def test_racing_acquirers_on_local_fs_exactly_one_wins(tmp_path):
    for stale in (False, True):
        (tmp_path / "_lock.json").unlink(missing_ok=True)
        if stale:
            _hold(tmp_path, "other-host", 1, age=3600)
        winners = _race(str(tmp_path))
        assert len(winners) == 1, (stale, winners)
        assert json.loads((tmp_path / "_lock.json").read_text())["owner"] == winners[0]


@pytest.mark.integration
def test_racing_acquirers_on_s3_exactly_one_wins(s3, s3_endpoint):
    s3.mkdir("lease-race")
    for i, stale in enumerate((False, True)):
        uri = f"s3://lease-race/t{i}"
        if stale:
            s3.pipe_file(
                f"lease-race/t{i}/_lock.json",
                json.dumps({"owner": "x", "host": "h", "heartbeat": 0}).encode(),
            )
        winners = _race(uri)
        assert len(winners) == 1, (stale, winners)
        assert json.loads(s3.cat_file(f"lease-race/t{i}/_lock.json"))["owner"] == winners[0]
        s3.invalidate_cache()


def test_a_holder_that_lost_the_lease_knows_it_at_its_next_write(tmp_path):
    lease = Lease(str(tmp_path), ttl_s=600, settle_s=0).acquire()
    lease.ensure()
    _hold(tmp_path, "other-host", 42, age=0)  # another job took over while this one was paused
    lease._verified -= 600  # ... for longer than the TTL
    with pytest.raises(LeaseLost, match="lost the lease on .* to host other-host pid 42"):
        lease.ensure()
    lease.release()
    assert json.loads((tmp_path / "_lock.json").read_text())["owner"] == "x"  # not removed: not ours
