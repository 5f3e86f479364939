"""A job that lost its output lease writes and removes nothing more, writes queued on its threads included."""

import json
import threading
import time
from pathlib import Path

import pytest

from omnilmm_ray import schema
from omnilmm_ray.commit import ShardCommitter, load_progress
from omnilmm_ray.lease import Lease, LeaseLost
from omnilmm_ray.sources import Shard


def rows(shard_id, lo, hi, end=None):
    out = [
        {"source": f"src-{shard_id}", "shard_id": shard_id, "key": f"k{i}", "sample_index": i, "caption": "c"}
        for i in range(lo, hi)
    ]
    if end is not None:
        out.append({"source": f"src-{shard_id}", "shard_id": shard_id, "sample_index": -1, "shard_rows": end})
    return schema.table(out, schema.ENGINE_SCHEMA)


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def earlier_attempt(run: Path, shards: list[Shard]) -> None:
    """What the job that took over loaded: shard a's first part file (rows 0-1)."""
    c = ShardCommitter(str(run), shards, commit_rows=2)
    c.add(rows("a", 0, 2))
    assert [p.name for p in run.iterdir()] == ["a.part-00000.parquet"]


# writes of shard a below: parts of rows 2-3, 4-5, 6-7, then its merge (the shard file, then the parts' removal)
WRITES = 5


@pytest.mark.parametrize("writers", [1, 8])
@pytest.mark.parametrize("lose_after", range(WRITES))
def test_a_guard_that_starts_raising_leaves_storage_untouched_from_then_on(tmp_path, writers, lose_after):
    shards = [Shard("a", "tar", "src-a")]
    earlier_attempt(tmp_path, shards)
    calls, at_loss = [], {}

    def guard():
        calls.append(1)
        if len(calls) > lose_after:
            # one shard's writes run in order: every write before this one has landed
            at_loss.setdefault("files", files(tmp_path))
            raise LeaseLost("lost the lease (test)")

    c = ShardCommitter(
        str(tmp_path),
        shards,
        commit_rows=2,
        progress=load_progress(str(tmp_path)),
        writers=writers,
        guard=guard,
    )
    with pytest.raises(LeaseLost):
        try:
            for b in (rows("a", 2, 4), rows("a", 4, 6), rows("a", 6, 8), rows("a", 8, 10, end=10)):
                c.add(b)
            c.flush()
        finally:
            c.close()
    assert files(tmp_path) == at_loss["files"]
    assert (tmp_path / "a.part-00000.parquet").exists()  # the part the job that took over loaded
    assert c.committed == set()


def _take_over(out: Path, lease: Lease) -> None:
    """Another job takes the lease over while this one is paused for longer than the TTL."""
    (out / "_lock.json").write_text(
        json.dumps({"owner": "x", "host": "other-host", "pid": 42, "heartbeat": time.time()})
    )
    lease._verified -= 600


def test_writes_queued_before_the_lease_was_lost_are_dropped(tmp_path):
    out, run = tmp_path, tmp_path / "run=1"
    shards = [Shard(s, "tar", f"src-{s}") for s in "abc"]
    earlier_attempt(run, shards)
    lease = Lease(str(out), ttl_s=600, settle_s=0).acquire()
    lease._stop.set()  # no heartbeat of its own: the test decides when the lease is lost
    go, checked = threading.Event(), []

    def guard():  # the writer threads reach their lease check only once the lease is lost
        go.wait()
        checked.append(threading.current_thread().name)
        lease.ensure()

    c = ShardCommitter(
        str(run), shards, commit_rows=2, progress=load_progress(str(run)), writers=8, guard=guard
    )
    c.add(rows("a", 2, 4))  # a part, queued
    c.add(rows("a", 4, 6, end=6))  # a's merge: it would remove the part the new holder loaded
    for s in "bc":
        c.add(rows(s, 0, 2))
        c.add(rows(s, 2, 3, end=3))
    before = files(run)
    _take_over(out, lease)
    go.set()
    with pytest.raises(LeaseLost, match="to host other-host pid 42"):
        c.flush()
    c.close()
    assert files(run) == before, "a write queued before the lease was lost touched the output"
    assert len(checked) == 3  # the first write of each shard checked (the later ones wait for it)
    assert c.committed == set()
    lease.release()
