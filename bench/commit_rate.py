"""The driver's commit rate: how many images/s of captions one job driver can take in and commit.

Every caption of a job, on any number of GPUs and hosts, passes through one driver loop (job.run_job): the
committer (`ShardCommitter.add`: a Parquet part or shard file per shard) and the progress reporter
(`ProgressReporter.observe`). This feeds that loop, in one process without Ray or an engine, with caption batches
as the engine actors return them (`--batch` rows, shards of `--per-shard` rows, `--in-flight` shards interleaved,
200-character captions) and reports images/s and shards/s, to local disk and to a local S3 API server (moto, whose
own request rate bounds the S3 figure: a real object store answers requests in parallel).
The driver's share of a job is then its images/s divided by this rate.

    python bench/commit_rate.py --shards 400 > bench/results/commit-rate-DATE.md
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

from omnilmm_ray.commit import ShardCommitter  # noqa: E402
from omnilmm_ray.progress import ProgressReporter  # noqa: E402
from omnilmm_ray.sources import Shard  # noqa: E402


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


def rate(run_uri: str, n: int, per_shard: int, batch: int, in_flight: int) -> dict:
    shards = [Shard(f"c{i:06d}", "tar", f"s3://in/{i:06d}.tar") for i in range(n)]
    data = list(batches(shards, per_shard, batch, in_flight))  # built before the clock starts
    committer = ShardCommitter(run_uri, shards, commit_rows=1024)
    reporter = ProgressReporter(
        shards, dict.fromkeys((s.shard_id for s in shards), per_shard), {}, 0, n, 3600
    )
    t0 = time.perf_counter()
    for b in data:  # the body of run_job's loop
        committer.add(b)
        reporter.observe(b, len(committer.committed))
    wall = time.perf_counter() - t0
    assert len(committer.committed) == n and not committer.uncommitted()
    return {"images_per_s": n * per_shard / wall, "shards_per_s": n / wall, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=400)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--in-flight", type=int, default=4)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(
            ("local disk", rate(f"{tmp}/run=1", args.shards, args.per_shard, args.batch, args.in_flight))
        )
    with local_s3():
        from omnilmm_ray.storage import resolve

        resolve("s3://commit")[0].mkdir("commit")
        rows.append(
            (
                "local S3 server (moto)",
                rate("s3://commit/run=1", args.shards, args.per_shard, args.batch, args.in_flight),
            )
        )
    print("# Driver commit rate\n")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
        f"Command: `python bench/commit_rate.py --shards {args.shards} --per-shard {args.per_shard} "
        f"--batch {args.batch} --in-flight {args.in_flight}`\n"
    )
    print("| output | images/s | shards/s | wall s |\n| --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['images_per_s']:,.0f} | {r['shards_per_s']:.1f} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
