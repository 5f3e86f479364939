"""The driver's commit rate: how many images/s of captions one job driver can take in and commit.

Every caption of a job, on any number of GPUs and hosts, passes through one driver loop (job.run_job): the
committer (`ShardCommitter.add`: a Parquet part or shard file per shard) and the progress reporter
(`ProgressReporter.observe`). This feeds that loop, in one process without Ray or an engine, with caption batches
as the engine actors return them (`--batch` rows, shards of `--per-shard` rows, `--in-flight` shards interleaved,
200-character captions) and reports images/s and shards/s, with the writes done one at a time and on the job's
writer threads (`commit.WRITERS`), side by side: to local disk, to a local S3 API server (moto), and to that
server behind a proxy that adds 30 ms per request (a remote object store's round trip).
The driver's share of a job is then its images/s divided by this rate.

    python bench/commit_rate.py --shards 200 > bench/results/commit-rate-DATE.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from driver_scale import _shard_table, local_s3  # noqa: E402

from omnilmm_ray.commit import WRITERS, ShardCommitter  # noqa: E402
from omnilmm_ray.progress import ProgressReporter  # noqa: E402
from omnilmm_ray.sources import Shard  # noqa: E402
from tests.faulty_proxy import FaultyProxy  # noqa: E402


def batches(shards: list[Shard], per_shard: int, batch: int, in_flight: int):
    """Batches as the pipeline returns them: rows of `in_flight` shards interleaved, each shard's end marker
    after its last rows."""
    rng = np.random.default_rng(0)
    for g in range(0, len(shards), in_flight):
        tables = [
            _shard_table(s.shard_id, g + i, per_shard, [], rng)
            for i, s in enumerate(shards[g : g + in_flight])
        ]
        mixed = pa.concat_tables([t.slice(o, batch) for o in range(0, per_shard + 1, batch) for t in tables])
        for o in range(0, mixed.num_rows, batch):
            yield mixed.slice(o, batch)


def rate(run_uri: str, n: int, per_shard: int, batch: int, in_flight: int, writers: int, opts=None) -> dict:
    shards = [Shard(f"c{i:06d}", "tar", f"s3://in/{i:06d}.tar") for i in range(n)]
    data = list(batches(shards, per_shard, batch, in_flight))  # built before the clock starts
    committer = ShardCommitter(run_uri, shards, opts, commit_rows=1024, writers=writers)
    counts = dict.fromkeys((s.shard_id for s in shards), per_shard)
    reporter = ProgressReporter(shards, counts, {}, 0, n, 3600)
    t0 = time.perf_counter()
    for b in data:  # the body of run_job's loop
        committer.add(b)
        reporter.observe(b, len(committer.committed))
    committer.flush()
    wall = time.perf_counter() - t0
    committer.close()
    assert len(committer.committed) == n and not committer.uncommitted()
    return {"images_per_s": n * per_shard / wall, "shards_per_s": n / wall, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--in-flight", type=int, default=4)
    a = ap.parse_args()
    shape = (a.shards, a.per_shard, a.batch, a.in_flight)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in (1, WRITERS):
            rows.append(("local disk", w, rate(f"{tmp}/run-{w}", *shape, w)))
    with local_s3():
        from omnilmm_ray.storage import resolve

        resolve("s3://commit")[0].mkdir("commit")
        for w in (1, WRITERS):
            rows.append(("local S3 server (moto)", w, rate(f"s3://commit/run-{w}", *shape, w)))
        with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], delay_s=0.03) as proxy:
            opts = {"endpoint_url": proxy.url}
            for w in (1, WRITERS):
                rows.append(("moto + 30 ms per request", w, rate(f"s3://commit/slow-{w}", *shape, w, opts)))
    print("# Driver commit rate\n")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Command: `python bench/commit_rate.py --shards {a.shards} --per-shard {a.per_shard} "
        f"--batch {a.batch} --in-flight {a.in_flight}`\n"
    )
    print("| output | writes in flight | images/s | shards/s | wall s | vs. one at a time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, w, r in rows:
        one = next(r1 for n1, w1, r1 in rows if n1 == name and w1 == 1)
        x = r["images_per_s"] / one["images_per_s"]
        print(
            f"| {name} | {w} | {r['images_per_s']:,.0f} | {r['shards_per_s']:.1f} | {r['wall_s']:.1f} | {x:.1f}x |"
        )


if __name__ == "__main__":
    main()
