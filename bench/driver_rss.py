"""The job driver's memory while it runs: RSS against images committed, on a long run of small images.

Builds `--shards` WebDataset tars of `--per-shard` tiny JPEGs (so the fake engine and decoding are fast and the
run is long in images, not in time), runs the job on them with the fake engine on its own local Ray, samples the
driver's memory every 2 s beside the number of shards committed, and reports the growth per image between 10 % and
90 % of the shards (start-up and sealing excluded), and the engine actor's private memory at 10, 50 and 90 %.
The driver's resident memory (VmRSS) is split into its private part (RssAnon) and the object store's shared pages
it has touched reading results (RssShmem), which are the store's memory, not the driver's.
With `ARROW_DEFAULT_MEMORY_POOL=system` in the environment the same run shows whether pyarrow's allocator is what
keeps the memory.

    python bench/driver_rss.py --shards 600 > bench/results/driver-rss-DATE.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnilmm_ray.memory import PROC_FIELDS, proc_memory  # noqa: E402
from omnilmm_ray.samples import draw, encode, write_tar  # noqa: E402


def memory_mb(pid: int) -> dict[str, float]:
    """The process's PROC_FIELDS (memory.proc_memory) in MB."""
    m = proc_memory(pid)
    return {f: m.get(f, 0) / 2**20 for f in PROC_FIELDS}


def actor_anon_mb() -> float | None:
    """The engine actor's private memory (RssAnon: its resident memory less the object store's shared pages it
    has touched, which are the store's, not the actor's), or None before it runs."""
    pids = subprocess.run(["pgrep", "-f", "CaptionStage"], capture_output=True, text=True).stdout.split()
    try:
        return max(memory_mb(int(p))["RssAnon"] for p in pids) if pids else None
    except (FileNotFoundError, ProcessLookupError):
        return None


def run(shards: Path, out: Path, env: dict) -> list[tuple[float, dict, int, float | None]]:
    """(seconds, the driver's PROC_FIELDS in MB, shard files committed, engine actor's RssAnon MB) every 2 s of
    one fake-engine job."""
    cmd = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--engine", "fake", "--input", str(shards)]
    p = subprocess.Popen(
        [*cmd, "--output", str(out)],
        cwd=ROOT,
        env={**os.environ, **env, "RAY_ADDRESS": "local"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples, t0 = [], time.time()
    while p.poll() is None:
        try:
            done = len(list(out.glob("run=*/*.parquet")))
            samples.append((time.time() - t0, memory_mb(p.pid), done, actor_anon_mb()))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(2)
    assert p.returncode == 0, f"job failed ({p.returncode})"
    return samples


def slope(samples: list[tuple[float, dict, int, float | None]], shards: int, per_shard: int) -> dict:
    lo = next(s for s in samples if s[2] >= shards // 10)
    mid = next(s for s in samples if s[2] >= shards // 2)
    hi = next(s for s in samples if s[2] >= shards * 9 // 10)
    images = (hi[2] - lo[2]) * per_shard
    return {
        "from": {"s": round(lo[0], 1), "shards": lo[2], **{f: round(lo[1][f]) for f in PROC_FIELDS}},
        "to": {"s": round(hi[0], 1), "shards": hi[2], **{f: round(hi[1][f]) for f in PROC_FIELDS}},
        "kb_per_image": {f: round((hi[1][f] - lo[1][f]) * 1024 / images, 3) for f in PROC_FIELDS},
        "peak_mb": {f: round(max(s[1][f] for s in samples)) for f in PROC_FIELDS},
        # the engine actor's private memory at 10 %, 50 % and 90 % of the shards: its recent-captions cache
        # (stages.RECENT_CAPTIONS) fills first, then it should stay level
        "actor_anon_mb": [None if s[3] is None else round(s[3]) for s in (lo, mid, hi)],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=600)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/driver-rss"))
    a = ap.parse_args()
    shards = a.work / f"in-{a.shards}x{a.per_shard}"
    if not shards.exists():
        for s in range(a.shards):
            imgs = [encode(draw(s * 10_000 + i, size=(64, 48))[0]) for i in range(a.per_shard)]
            write_tar(
                shards / f"{s:05d}.tar", [(f"{s:05d}{i:04d}", {"jpg": im}) for i, im in enumerate(imgs)]
            )
    res = {}
    for name, env in (("default", {}), ("system_allocator", {"ARROW_DEFAULT_MEMORY_POOL": "system"})):
        res[name] = slope(run(shards, a.work / f"out-{time.time_ns()}", env), a.shards, a.per_shard)
    print("# Driver memory while a job runs\n")
    print(
        f"Machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}. Command: "
        f"`python bench/driver_rss.py --shards {a.shards} --per-shard {a.per_shard}` ({a.shards * a.per_shard:,} "
        "64x48 JPEGs, fake engine, local Ray). Growth between 10 % and 90 % of the shards committed.\n"
    )
    print("| allocator | driver memory | at 10 % (MB) | at 90 % (MB) | growth per image (KB) | peak (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in res.items():
        for f, what in zip(
            PROC_FIELDS, ("resident (VmRSS)", "private (RssAnon)", "object store pages (RssShmem)")
        ):
            print(
                f"| {name} | {what} | {r['from'][f]} | {r['to'][f]} | {r['kb_per_image'][f]} | {r['peak_mb'][f]} |"
            )
    print("\nThe engine actor's private memory (RssAnon, MB) at 10 % / 50 % / 90 % of the shards:\n")
    for name, r in res.items():
        print(f"- {name}: {' / '.join(str(x) for x in r['actor_anon_mb'])}")
    print(f"\nRaw: `{json.dumps(res)}`")


if __name__ == "__main__":
    main()
