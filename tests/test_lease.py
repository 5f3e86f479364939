"""The output lease: refuse a live holder, take over a dead one."""

import json
import threading
import time
from pathlib import Path

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


def _race(uri, n=8, storage_options=None):
    """n jobs try to take the same free (or stale) lease at once; returns the owners that got it."""
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(n)

    def take(_):
        lease = Lease(uri, ttl_s=600, storage_options=storage_options, settle_s=0)
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
        winners = _race(uri, storage_options={"skip_instance_cache": True})  # one client per job
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


@pytest.mark.integration
def test_s3_takeover_is_conditional_on_the_lease_it_read(s3, s3_endpoint):
    from omnilmm_ray.lease import _Taken

    s3.mkdir("lease-cas")
    s3.pipe_file("lease-cas/_lock.json", json.dumps({"owner": "x", "heartbeat": 0}).encode())
    lease = Lease("s3://lease-cas", ttl_s=600, settle_s=0)
    cur, token = lease.store.read()
    s3.pipe_file("lease-cas/_lock.json", json.dumps({"owner": "y", "heartbeat": time.time()}).encode())
    with pytest.raises(_Taken):  # another job took it between our read and our write
        lease.store.take({"owner": lease.me["owner"]}, token)
    assert json.loads(s3.cat_file("lease-cas/_lock.json"))["owner"] == "y"


def _lock_free(folder: Path) -> bool:
    """Whether no process holds the output folder's lock (lease.py's local compare-and-swap) now."""
    import fcntl
    import os

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops a lock we took


def _files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


@pytest.mark.integration
@pytest.mark.slow
def test_a_paused_job_that_lost_its_lease_stops_without_writing(ray_local, tmp_path):
    """Job A is paused past lock_ttl_s, B takes over and finishes A's run, A continues: A exits 1 with one
    line and writes nothing; the run holds exactly one row per image."""
    import os
    import signal
    import subprocess
    import sys

    import pyarrow.dataset as pads
    import ray
    import yaml

    from omnilmm_ray.samples import build_samples
    from tests.conftest import ROOT

    build_samples(tmp_path / "in", shards=2, per_shard=8)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}

    def start(fake_delay_s):
        """A batch takes `fake_delay_s` in the engine (not part of the run's settings: B resumes A's run)."""
        cfg = tmp_path / f"job-{fake_delay_s}.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "engine": {"backend": "fake", "fake_delay_s": fake_delay_s},
                    # one batch's images in the engine: calls of 1 image (blocks of ~3 rows) would run 4 at once
                    "scale": {"batch_size": 2, "concurrent_batches": 1},
                    # not 0.5: equal resources fuse it into the engine actor
                    "preprocess": {"num_cpus": 0.75},
                    "sink": {"commit_rows": 2, "lock_ttl_s": 4},
                }
            )
        )
        cmd = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--config", str(cfg)]
        cmd += ["--input", str(tmp_path / "in" / "webdataset"), "--output", str(out)]
        return subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    a = start(fake_delay_s=2)
    deadline = time.time() + 120
    while not list(out.glob("run=*/*.parquet")) and time.time() < deadline and a.poll() is None:
        time.sleep(0.05)
    # Pause A between writes (a batch takes 2 s, a write milliseconds): a write A had already started when
    # it was paused would still land, the window that the lease documents and the commit checks cover.
    while (seen := _files(out)) != (time.sleep(0.5) or _files(out)) and time.time() < deadline:
        pass
    assert a.poll() is None and seen, a.stderr.read().decode()[-2000:]
    os.killpg(a.pid, signal.SIGSTOP)
    while not _lock_free(out):  # stopped inside a heartbeat's write, B would get exit 4 (test_lease_lock.py)
        os.killpg(a.pid, signal.SIGCONT)
        time.sleep(0.05)
        os.killpg(a.pid, signal.SIGSTOP)
    try:
        # B refuses a lease whose heartbeat is fresh and waits out one that missed two beats: start it then
        while time.time() - json.loads((out / "_lock.json").read_text())["heartbeat"] < 2.5:
            time.sleep(0.1)
        b = start(fake_delay_s=0.1)  # B's speed is not what this test is about: it finishes A's run quickly
        assert b.wait(timeout=180) == 0, b.stderr.read().decode()[-3000:]
        after_b = _files(out)
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    assert a.wait(timeout=120) == 1
    last = a.stderr.read().decode().strip().splitlines()[-1]
    assert last.startswith("error: lost the lease on ") and "this job stops without writing" in last, last
    assert _files(out) == after_b, "A wrote after it lost the lease"
    runs = list(out.glob("run=*"))
    assert len(runs) == 1 and (runs[0] / "_SUCCESS").exists()
    t = pads.dataset(str(runs[0]), format="parquet").to_table()
    keys = [(r["source"], r["sample_index"]) for r in t.select(["source", "sample_index"]).to_pylist()]
    assert len(keys) == 16 and len(set(keys)) == 16
