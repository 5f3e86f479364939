"""Bookkeeping at scale: a nightly run's driver memory and time over 100 k .. 10 M sealed rows of history.

For each size, builds a sealed output through the project's own writing code (ShardCommitter shard files
of 10,000 rows with 200-character synthetic captions, verify_run, the summary, build_index, `_SUCCESS`),
planting the sha256 of half the images of a small new shard in it. Then, each in a fresh process so peak
RSS is its own: the nightly job over that new shard (fake engine, local Ray; driver peak RSS, wall time,
images reused), one CPU worker's reuse lookup of the new shard's hashes, the engine actor's construction,
verify of the whole history run, and the latest view streamed to a Parquet file.
`--loose-files N ...`: planning a run over N tiny loose files (1,000 per folder, never decoded), then the
nightly plan after one file was added: driver peak RSS, time and plan bytes per file.
`--snapshot`: publishing the snapshot (snapshot.py) over each --rows history: the first publish, a night of
1 % new images, a night with a new, a changed and a deleted shard: time, peak RSS, files rewritten.

    python bench/driver_scale.py --rows 100000 1000000 --work /tmp/scale
    python bench/driver_scale.py --loose-files 200000 1000000 --baseline /tmp/old-code --work /tmp/scale
    python bench/driver_scale.py --snapshot --rows 1000000 10000000 --work /tmp/scale
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnilmm_ray import schema  # noqa: E402
from omnilmm_ray.commit import ShardCommitter, verify_run  # noqa: E402
from omnilmm_ray.config import JobConfig, generation_fingerprint  # noqa: E402
from omnilmm_ray.job import summarize  # noqa: E402
from omnilmm_ray.reuse import build_index  # noqa: E402
from omnilmm_ray.samples import draw, encode, write_tar  # noqa: E402
from omnilmm_ray.sources import Shard  # noqa: E402
from omnilmm_ray.storage import write_bytes_atomic, write_json  # noqa: E402
from omnilmm_ray.table import Run  # noqa: E402

ROWS_PER_SHARD = 10_000
NEW_IMAGES = 256  # the nightly's new shard; half of them are re-uploads of images in the history
WORDS = np.array("a red square blue circle on green yellow background small large centre left right".split())


def nightly_images() -> list[bytes]:
    return [encode(draw(10_000 + i, size=(96, 72))[0]) for i in range(NEW_IMAGES)]


def _shard_table(sid: str, s: int, n: int, planted: list[str], rng) -> pa.Table:
    sha = [hashlib.sha256(f"{s}-{i}".encode()).hexdigest() for i in range(n)]
    sha[: len(planted)] = planted
    words = WORDS[rng.integers(0, len(WORDS), size=(n, 40))]
    caps = [" ".join(w)[:200].ljust(200, ".") for w in words]
    cols = {
        "source": pa.array([f"s3://history/{s:06d}.tar"] * n),
        "key": pa.array([f"{i:09d}" for i in range(n)]),
        "sample_index": pa.array(np.arange(n)),
        "caption": pa.array(caps),
        "width": pa.array(np.full(n, 640, np.int32)),
        "height": pa.array(np.full(n, 480, np.int32)),
        "model": pa.array(["fake"] * n),
        "prompt": pa.array([JobConfig(inputs=["x"], output="o").prompt] * n),
        "input_tokens": pa.array(np.full(n, 300, np.int32)),
        "output_tokens": pa.array(np.full(n, 48, np.int32)),
        "finish_reason": pa.array(["stop"] * n),
        "sha256": pa.array(sha),
        "cached": pa.array(np.zeros(n, bool)),
        "shard_id": pa.array([sid] * n),
    }
    rows = pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in schema.ENGINE_SCHEMA})
    end = schema.table(
        [{"shard_id": sid, "sample_index": -1, "shard_rows": n, "source": "x"}], schema.ENGINE_SCHEMA
    )
    return pa.concat_tables([rows.cast(schema.ENGINE_SCHEMA), end])


def _history_shard(k: int, fp: str = "1") -> Shard:
    uri = f"s3://history/{k:06d}.tar"
    return Shard(f"h{k:06d}", "tar", uri, (), {uri: f"{fp}:{k}"})


def seal_run(
    out: Path,
    rid: str,
    cfg: JobConfig,
    written: list[tuple[int, int]],
    present: list[Shard],
    planted: list[str] = (),
    index: bool = True,
) -> dict:
    """One sealed run, written and sealed as job.run_job does it: `written` (shard number, rows) are read by
    it, `present` is every shard its planning listed (its present record)."""
    t0 = time.time()
    run_uri = str(out / f"run={rid}")
    by_number = {int(s.shard_id[1:]): s for s in present}
    shards = [by_number[k] for k, _ in written]
    from omnilmm_ray.present import PresentWriter
    from omnilmm_ray.storage import resolve

    with PresentWriter(str(out), rid, None) as record:
        for s in present:
            record.add(s)
    plan = {"run_id": rid, "fingerprint": generation_fingerprint(cfg), "inputs": ["s3://history"]}
    fs, _ = resolve(str(out))
    shard_dicts = [s.to_dict() for s in shards]
    write_json(fs, f"{run_uri}/_plan.json", {**plan, "present": record.uri, "shards": shard_dicts})
    committer = ShardCommitter(run_uri, shards, commit_rows=1024)
    rng = np.random.default_rng(0)
    for i, ((k, n), s) in enumerate(zip(written, shards)):
        committer.add(_shard_table(s.shard_id, k, n, planted if i == len(shards) // 2 else [], rng))
    counts = verify_run(run_uri, shards)
    run = Run(rid, run_uri, shards, False)
    write_json(fs, f"{run_uri}/_summary.json", summarize(cfg, run, counts, {}))
    if index:
        build_index(run_uri, [s.shard_id for s in shards], counts.rows)
    write_bytes_atomic(fs, f"{run_uri}/_SUCCESS", b"")
    return {"rows": counts.rows, "shards": len(shards), "build_s": round(time.time() - t0, 1)}


def build(rows: int, out: Path, cfg: JobConfig, planted: list[str], index: bool = True) -> dict:
    """One sealed run of `rows` rows in shards of ROWS_PER_SHARD."""
    sizes = [(k, min(ROWS_PER_SHARD, rows - k * ROWS_PER_SHARD)) for k in range(-(-rows // ROWS_PER_SHARD))]
    present = [_history_shard(k) for k, _ in sizes]
    return seal_run(out, "20260101T000000000000Z", cfg, sizes, present, planted, index)


# Each probe runs in a fresh interpreter and prints {"s": seconds, "peak_mb": its RSS peak (VmHWM), "base_mb":
# RSS after imports, ...}; `extra_mb` is peak minus base: what the measured step itself added.
PROBE = r"""
import json, sys, time
sys.path.insert(0, {root!r})
{imports}
def rss_mb(field="VmHWM"):  # not getrusage: ru_maxrss survives fork+exec, so it would show the parent's
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
base = rss_mb("VmRSS")
t0 = time.time()
extra = {{}}
{body}
print("PROBE " + json.dumps({{"s": round(time.time() - t0, 2), "peak_mb": round(rss_mb()), "base_mb": round(base), **extra}}))
"""


def probe(imports: str, body: str, env: dict | None = None, root: Path = ROOT) -> dict:
    code = PROBE.format(root=str(root), imports=imports, body=body)
    r = subprocess.run(  # in `root`: Ray workers find modules in the driver's working directory too
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=root,
    )
    line = [x for x in r.stdout.splitlines() if x.startswith("PROBE ")]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"probe failed ({r.returncode}): {r.stderr[-3000:]}")
    out = json.loads(line[-1][6:])
    out["extra_mb"] = out["peak_mb"] - out["base_mb"]
    return out


def nightly(out: Path, new_dir: Path, root: Path = ROOT) -> dict:
    """The nightly job over the new shard, in a fresh process running the code at `root`; the run it adds
    is removed after, so every measurement sees the same history."""
    before = set(p.name for p in out.glob("run=*"))
    args = ["--input", str(new_dir), "--output", str(out), "--engine", "fake"]
    res = probe(
        "from omnilmm_ray import cli\nfrom omnilmm_ray.table import OutputTable",
        f"code = cli.main({args!r})\n"
        f"t = OutputTable({str(out)!r}); s = json.load(open(t.path + '/run=' + t.sealed_runs()[-1] + '/_summary.json'))\n"
        "extra = {'exit': code, 'rows': s['rows'], 'reused': s['counts']['cached']}",
        env={"PYTHONPATH": str(root)},  # Ray workers import the same code as the driver
        root=root,
    )
    for p in out.glob("run=*"):
        if p.name not in before:
            shutil.rmtree(p)
    return res


def measure(out: Path, new_dir: Path, work: Path, baseline: Path | None) -> dict:
    res = {}
    common = "from omnilmm_ray import cli, job\nfrom omnilmm_ray.table import OutputTable, latest_to_parquet"
    res["nightly_job"] = nightly(out, new_dir)
    if baseline:
        res["nightly_job_baseline_code"] = nightly(out, new_dir, baseline)
    shas = [hashlib.sha256(b).hexdigest() for b in nightly_images()]
    res["reuse_lookup_worker"] = probe(
        common + "\nimport pyarrow as pa",
        f"idx = OutputTable({str(out)!r}).reuse_index()\n"
        f"q = pa.table({{'sha256': {shas!r}, 'prompt': [job.JobConfig(inputs=['x'], output='o').prompt] * {len(shas)}}})\n"
        "t1 = time.time(); hits = idx.lookup(q); extra = {'hits': len(hits), 'lookup_s': round(time.time() - t1, 3)}",
    )
    res["engine_actor_construct"] = probe(
        "from omnilmm_ray.config import JobConfig\nfrom omnilmm_ray.stages import CaptionStage",
        f"CaptionStage(JobConfig(inputs=['x'], output='o', engine={{'backend': 'fake'}}), {str(out)!r})",
    )
    res["verify_history"] = probe(
        common + "\nfrom omnilmm_ray.commit import verify_run\nfrom omnilmm_ray.sources import Shard",
        f"t = OutputTable({str(out)!r}); rid = t.sealed_runs()[0]\n"
        "shards = [Shard.from_dict(d) for d in t.plan_of(rid)['shards']]\n"
        "t1 = time.time(); c = verify_run(t.run_uri(rid), shards); extra = {'rows': c.rows, 'verify_s': round(time.time() - t1, 2)}",
    )
    dest = work / "latest.parquet"
    res["latest_to_parquet"] = probe(
        common, f"extra = {{'rows': latest_to_parquet({str(out)!r}, {str(dest)!r})}}"
    )
    dest.unlink(missing_ok=True)
    return res


@contextlib.contextmanager
def local_s3():
    """A local S3 API server (moto's, its own process) that this process's s3:// clients talk to."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    try:
        time.sleep(3)
        yield
    finally:
        server.terminate()


def s3_verify(shards: int, work: Path) -> dict:
    """verify_run over `shards` small committed shard files on a local S3 server (moto's)."""
    with local_s3():
        from omnilmm_ray.storage import resolve

        fs, _ = resolve("s3://verify")
        fs.mkdir("verify")
        shard_list = [Shard(f"v{s:06d}", "tar", f"s3://in/{s}.tar") for s in range(shards)]
        committer = ShardCommitter("s3://verify/run=1", shard_list)
        t0 = time.time()
        rng = np.random.default_rng(0)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as ex:  # only to build the test data faster; the committer is the job's
            committer.pending = {s.shard_id: _pending(s, rng) for s in shard_list}
            list(ex.map(lambda s: committer._commit(s.shard_id, committer.pending[s.shard_id]), shard_list))
        built = time.time() - t0
        return {
            "shards": shards,
            "write_s": round(built, 1),
            **probe(
                "from omnilmm_ray.commit import verify_run\nfrom omnilmm_ray.sources import Shard",
                f"shards = [Shard(f'v{{s:06d}}', 'tar', f's3://in/{{s}}.tar') for s in range({shards})]\n"
                "c = verify_run('s3://verify/run=1', shards); extra = {'rows': c.rows}",
            ),
        }


def s3_overlap(nights: int, files: int, latencies_s: list[float], per_listed: int = 1000) -> list[dict]:
    """Nightly planning over a flat folder of `files` files that `nights` sealed runs each read a share of, so
    each listed shard (`per_listed` files) overlaps every night's listing; on a local S3 server behind a proxy
    that adds a fixed latency per request (a remote object store's round trip; moto itself answers in a few ms).
    Same code, side by side: as before this change (listings read one at a time, a cache of 64 listings),
    reads in flight only, and as now (reads in flight, cache counted in files)."""
    from dataclasses import replace

    from omnilmm_ray import listings
    from tests.faulty_proxy import FaultyProxy

    def shard(sid, members):
        fps = {f"s3://flat/{k}": f"etag-{k}" for k in members}
        return Shard(
            sid,
            "files",
            "s3://flat",
            tuple(members),
            fps,
            sidecars=("",) * len(members),
            count=len(members),
            first=members[0],
            last=members[-1],
        )

    keys = [f"{i:07d}.jpg" for i in range(files)]
    before_cache = 64 * (files // nights)  # the files in 64 of these listings
    modes = (
        ("before", 1, before_cache),
        ("in_flight_only", listings.LISTINGS_IN_FLIGHT, before_cache),
        ("now", listings.LISTINGS_IN_FLIGHT, listings.CACHED_FILES),
    )
    out = []
    with local_s3():
        from omnilmm_ray.storage import resolve

        resolve("s3://plans")[0].mkdir("plans")
        with listings.ListingWriter("s3://plans/out", None) as w:  # night n read every nights-th file from n
            sealed = [w.compact(shard(f"n{n}", keys[n::nights])) for n in range(nights)]
        for latency in latencies_s:
            res = {
                "nights": nights,
                "files": files,
                "listed_shards": files // per_listed,
                "added_latency_s": latency,
            }
            for name, in_flight, cached in modes:
                with FaultyProxy(os.environ["AWS_ENDPOINT_URL"], delay_s=latency) as proxy:
                    via = [[replace(s, listing_options={"endpoint_url": proxy.url})] for s in sealed]
                    keep = listings.LISTINGS_IN_FLIGHT, listings.CACHED_FILES
                    listings.LISTINGS_IN_FLIGHT, listings.CACHED_FILES = in_flight, cached
                    try:
                        covered = listings.CoveredFiles(via)
                        t0 = time.perf_counter()
                        for i in range(0, files, per_listed):
                            assert (
                                covered.new_part(shard(f"t{i}", keys[i : i + per_listed]), redo=set()) is None
                            )
                        res[f"{name}_s"] = round(time.perf_counter() - t0, 3)
                    finally:
                        listings.LISTINGS_IN_FLIGHT, listings.CACHED_FILES = keep
                    res[f"{name}_gets"] = len(proxy.requests)
            res["speedup_now_vs_before"] = round(res["before_s"] / res["now_s"], 1)
            out.append(res)
    return out


def _pending(s: Shard, rng):
    from omnilmm_ray.commit import _Pending

    t = _shard_table(s.shard_id, 0, 10, [], rng)
    rows = t.slice(0, 10)
    return _Pending(tables=[rows], seen=set(range(10)), rows=10, expected=list(range(10)))


def loose_files(n: int, work: Path, root: Path) -> dict:
    """Plan a new run over `n` loose files, seal it as planned, then plan the nightly run after one file
    was added, each in a fresh process running the code at `root`."""
    src = work / f"loose-{n}"
    if not (src / "_complete").exists():
        shutil.rmtree(src, ignore_errors=True)
        for i in range(n):
            d = src / f"f{i // 1000:05d}"
            if i % 1000 == 0:
                d.mkdir(parents=True)
            (d / f"img{i:08d}.jpg").write_bytes(b"not decoded when planning")
        (src / "_complete").write_bytes(b"")  # a sidecar-free marker: ignored by the planner
    out = work / f"loose-out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    (src / "f00000" / "img-added.jpg").unlink(missing_ok=True)
    imports = "from omnilmm_ray.config import JobConfig\nfrom omnilmm_ray.table import OutputTable"
    body = (
        f"cfg = JobConfig(inputs=[{str(src)!r}], output={str(out)!r})\n"
        "run = OutputTable(cfg.output).open_run(cfg); extra = {'shards': len(run.shards)}"
    )
    res = {"files": n, "plan": probe(imports, body, root=root)}
    (run_dir,) = out.glob("run=*")
    res["plan"]["plan_bytes_per_file"] = round(
        sum(f.stat().st_size for f in [*out.rglob("_plan.json"), *out.glob("_files/*")]) / n, 1
    )
    res["plan"]["plan_json_bytes_per_file"] = round((run_dir / "_plan.json").stat().st_size / n, 1)
    write_json(LocalFileSystem(), str(run_dir / "_summary.json"), {"errors_by_kind": {}})
    (run_dir / "_SUCCESS").write_bytes(b"")
    (src / "f00000" / "img-added.jpg").write_bytes(b"new")
    res["nightly_plan"] = probe(imports, body, root=root)
    (src / "f00000" / "img-added.jpg").unlink()
    return res


PUBLISH = (
    "from omnilmm_ray.snapshot import publish\nfrom omnilmm_ray.table import OutputTable",
    "r = publish(OutputTable({out!r}))\n"
    "extra = {{k: r[k] for k in ('mode', 'files_added', 'files_removed', 'rows_written')}}",
)


def snapshot_scale(rows: int, work: Path) -> dict:
    """The snapshot over a sealed history of `rows` rows (shard files of ROWS_PER_SHARD): its first publish
    (a full write streamed from the latest view), then two nights, each sealed and published incrementally:
    1 % new images; then one new shard plus one shard shrunk by 100 images and one deleted (the same night
    at every size). Each publish runs in a fresh process; the table's rows are checked after each."""
    from deltalake import DeltaTable

    cfg = JobConfig(inputs=["x"], output="o", engine={"backend": "fake"})
    out = work / f"snapshot-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    built = build(rows, out, cfg, [], index=False)
    shards, expected = built["shards"], built["rows"]
    res = {"rows": rows, "build_s": built["build_s"]}

    def measure(name: str) -> None:
        res[name] = probe(PUBLISH[0], PUBLISH[1].format(out=str(out)))
        d = DeltaTable(str(out / "captions"))
        res[name]["table_files"] = len(d.file_uris())
        assert (got := d.count()) == expected, (name, got, expected)
        print(name, json.dumps(res[name]), flush=True)

    measure("first_publish")
    new = max(1, rows // 100 // ROWS_PER_SHARD)  # 1 % new images
    present = {k: _history_shard(k) for k in range(shards + new)}
    added = [(k, ROWS_PER_SHARD) for k in range(shards, shards + new)]
    seal_run(out, "20260102T000000000000Z", cfg, added, list(present.values()), index=False)
    expected += new * ROWS_PER_SHARD
    measure("night_1pct_new")
    shards += new
    present[3] = _history_shard(3, "2")  # shrunk: a new fingerprint, read whole
    del present[7]
    present[shards] = _history_shard(shards)
    written = [(3, ROWS_PER_SHARD - 100), (shards, ROWS_PER_SHARD)]
    seal_run(out, "20260103T000000000000Z", cfg, written, list(present.values()), index=False)
    expected += ROWS_PER_SHARD - 100 - ROWS_PER_SHARD
    measure("night_new_changed_deleted")
    res["disk_mb"] = {
        "run_partitions": round(sum(f.stat().st_size for f in out.glob("run=*/*")) / 2**20),
        "snapshot": round(
            sum(f.stat().st_size for f in (out / "captions").rglob("*") if f.is_file()) / 2**20
        ),
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/driver-scale"))
    ap.add_argument("--keep", action="store_true", help="reuse built histories from an earlier call")
    ap.add_argument("--baseline", type=Path, help="also run the nightly job with the code in this folder")
    ap.add_argument("--only-nightly", action="store_true", help="measure the nightly job(s) only")
    ap.add_argument("--s3-verify-shards", type=int, default=0, help="also: verify_run of N shards on moto")
    ap.add_argument("--loose-files", type=int, nargs="+", help="only: plan runs over N loose files")
    ap.add_argument(
        "--s3-overlap", type=int, help="only: plan a listed shard overlapping N sealed listings on moto"
    )
    ap.add_argument("--snapshot", action="store_true", help="only: publishing the snapshot over --rows")
    a = ap.parse_args()
    if a.snapshot:
        res = {"machine": f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}"}
        for rows in a.rows:
            res[rows] = snapshot_scale(rows, a.work)
        print("RESULTS " + json.dumps(res))
        return
    if a.loose_files:
        res = {"machine": f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}"}
        for n in a.loose_files:
            res[n] = {"code": loose_files(n, a.work, ROOT)}
            if a.baseline:
                res[n]["baseline_code"] = loose_files(n, a.work, a.baseline)
            print(json.dumps(res[n], indent=1), flush=True)
        print("RESULTS " + json.dumps(res))
        return
    if a.s3_overlap:
        print("RESULTS " + json.dumps({"s3_overlap": s3_overlap(a.s3_overlap, 4000, [0.0, 0.03])}))
        return
    if a.s3_verify_shards:
        print("RESULTS " + json.dumps({"s3_verify": s3_verify(a.s3_verify_shards, a.work)}))
        return
    cfg = JobConfig(inputs=["x"], output="o", engine={"backend": "fake"})
    images = nightly_images()
    new_dir = a.work / "new"
    write_tar(new_dir / "nightly.tar", [(f"n{i:04d}", {"jpg": im}) for i, im in enumerate(images)])
    planted = [hashlib.sha256(b).hexdigest() for b in images[: NEW_IMAGES // 2]]
    results = {"machine": f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}"}
    for rows in a.rows:
        out = a.work / f"out-{rows}"
        if not (a.keep and out.exists()):
            shutil.rmtree(out, ignore_errors=True)
            built = build(rows, out, cfg, planted)
        else:
            built = {"rows": rows, "build_s": None}
        built["disk_mb"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20)
        print(f"built {rows}: {built}", flush=True)
        if a.only_nightly:
            results[rows] = {"built": built, "nightly_job": nightly(out, new_dir)}
            if a.baseline:
                results[rows]["nightly_job_baseline_code"] = nightly(out, new_dir, a.baseline)
        else:
            results[rows] = {"built": built, **measure(out, new_dir, a.work, a.baseline)}
        print(json.dumps(results[rows], indent=1), flush=True)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
