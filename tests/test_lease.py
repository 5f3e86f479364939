"""The output lease: refuse a live holder, take over a dead one."""

import json
import time

import pytest

from omnilmm_ray.lease import Lease, LeaseHeld


def _hold(tmp_path, host, pid, age):
    (tmp_path / "_lock.json").write_text(
        json.dumps({"owner": "x", "host": host, "pid": pid, "heartbeat": time.time() - age})
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
    _hold(tmp_path, socket.gethostname(), int(dead.stdout), age=0)
    with Lease(str(tmp_path), ttl_s=600, settle_s=0) as lease:
        assert json.loads((tmp_path / "_lock.json").read_text())["owner"] == lease.me["owner"]
