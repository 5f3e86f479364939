"""Loose image files: listed as a stream, planned compactly (a plan does not grow with the files of a
shard), nightly runs caption exactly the changed and added files, and plans made before still work."""

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import yaml

from omnilmm_ray import cli
from omnilmm_ray.config import InputConfig, JobConfig
from omnilmm_ray.readers import read_shard
from omnilmm_ray.samples import draw, encode
from omnilmm_ray.sources import Shard, iter_shards, load_listing, plan_shards
from omnilmm_ray.storage import write_bytes_atomic, write_json
from omnilmm_ray.table import OutputTable


def _folder(root, n, size=(64, 48)):
    for i in range(n):
        (root / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 2}" / f"{i:05d}.jpg").write_bytes(encode(draw(i, size=size)[0]))
    return root


def test_listing_streams_shards_before_the_folder_walk_ends(tmp_path):
    _folder(tmp_path, 8)
    shards = iter_shards([str(tmp_path)], InputConfig(files_per_shard=2))
    first = next(shards)
    assert first.members == ("d0/00000.jpg", "d0/00002.jpg")
    # a file added to a folder the walk has not reached yet is still found: nothing was listed up front
    (tmp_path / "d1" / "99999.jpg").write_bytes(encode(draw(9)[0]))
    assert [m for s in shards for m in s.members][-1] == "d1/99999.jpg"


def test_plan_size_does_not_grow_with_files_per_shard(tmp_path):
    sizes = {}
    for n, name in ((8, "small"), (400, "large")):
        cfg = JobConfig(inputs=[str(_folder(tmp_path / name / "in", n))], output=str(tmp_path / name / "out"))
        cfg.input.files_per_shard = n // 2
        OutputTable(cfg.output).open_run(cfg)
        (plan,) = (tmp_path / name / "out").glob("run=*/_plan.json")
        sizes[n] = len(plan.read_bytes())
        shards = json.loads(plan.read_bytes())["shards"]
        assert [s["count"] for s in shards] == [n // 2, n // 2] and "members" not in shards[0]
    # two shards each way, with names of the same length: only the digits of counts and sizes differ
    assert sizes[400] <= sizes[8] + 16, sizes


def test_plan_made_before_compact_shards_resumes_and_counts_as_done(tmp_path):
    inputs, out = _folder(tmp_path / "in", 6), tmp_path / "out"
    cfg = JobConfig(inputs=[str(inputs)], output=str(out))
    cfg.input.files_per_shard = 4
    table = OutputTable(str(out))
    fp = table.open_run(cfg, write=False).plan["fingerprint"]
    old = []  # the entries a plan of earlier versions holds: every member and fingerprint inline
    for s in plan_shards(cfg.inputs, cfg.input):
        d = s.to_dict()
        for k in ("count", "first", "last", "listing"):
            del d[k]
        old.append(d)
    write_json(table.fs, f"{out}/run=1/_plan.json", {"run_id": "1", "fingerprint": fp, "shards": old})
    run = table.open_run(cfg)
    assert run.resumed and [s.files for s in run.shards] == [4, 2]
    rows = pa.concat_tables([t for s in run.shards for t in read_shard(s, cfg.input)]).to_pylist()
    assert sorted(r["key"] for r in rows if r["key"]) == sorted(f"d{i % 2}/{i:05d}.jpg" for i in range(6))
    # sealed, it counts as done: the next plan reads only a changed file
    write_json(table.fs, f"{out}/run=1/_summary.json", {"errors_by_kind": {}})
    write_bytes_atomic(table.fs, f"{out}/run=1/_SUCCESS", b"")
    (inputs / "d1" / "00003.jpg").write_bytes(encode(draw(33)[0]))
    (new,) = table.open_run(cfg).shards
    assert load_listing(new).members == ("d1/00003.jpg",)


def _job(tmp_path, args, **cfg):
    f = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return cli.main(["--config", str(f), *args])


@pytest.mark.integration
def test_nightly_over_s3_folder_captions_exactly_the_changed_and_added_file(ray_local, s3, tmp_path):
    s3.mkdir("loose-nightly")
    for i in range(10):
        s3.pipe(f"loose-nightly/pics/a{i % 2}/img{i:02d}.jpg", encode(draw(i, size=(64, 48))[0]))
    out, calls = tmp_path / "out", tmp_path / "calls.log"
    args = ["--input", "s3://loose-nightly/pics", "--output", str(out)]
    cfg = {"engine": {"backend": "fake", "fake_calls_log": str(calls)}, "input": {"files_per_shard": 3}}
    assert _job(tmp_path, args, **cfg) == 0
    assert sum(int(x) for x in calls.read_text().split()) == 10

    # night 2: one file changed, one added in the middle of a folder (every later shard boundary moves)
    s3.pipe("loose-nightly/pics/a0/img04.jpg", encode(draw(104, size=(64, 48))[0]))
    s3.pipe("loose-nightly/pics/a1/img04b.jpg", encode(draw(105, size=(64, 48))[0]))
    calls.write_text("")
    assert _job(tmp_path, args, **cfg) == 0
    table = OutputTable(str(out))
    first, second = table.sealed_runs()
    plan = table.plan_of(second)
    assert all("members" not in s and s["listing"] for s in plan["shards"])
    rows = pads.dataset(str(out / f"run={second}"), format="parquet").to_table().to_pylist()
    assert sorted(r["key"] for r in rows) == ["a0/img04.jpg", "a1/img04b.jpg"]
    assert not any(r["cached"] for r in rows) and sum(int(x) for x in calls.read_text().split()) == 2
    # night 3: nothing changed, nothing planned
    assert _job(tmp_path, args, **cfg) == 0
    assert table.plan_of(table.sealed_runs()[-1])["shards"] == []


def _loose(sid: str, folder: str, members: list[str], etag) -> Shard:
    """A listed loose-file shard of `members` (sorted keys) with fingerprints `etag(key)`."""
    fps = {f"{folder}/{k}": etag(k) for k in members}
    return Shard(
        sid,
        "files",
        folder,
        tuple(members),
        fps,
        sidecars=("",) * len(members),
        count=len(members),
        first=members[0],
        last=members[-1],
    )


def test_nightly_plan_with_more_overlapping_sealed_listings_than_it_caches(tmp_path, monkeypatch):
    """A flat folder that grows every night: each sealed nightly shard spans the folder's key range, so a listed
    shard overlaps one sealed listing per night. With more nights than the cache holds (and than are read at
    once), every file still gets the fingerprint of the newest run that read it."""
    from omnilmm_ray import listings

    monkeypatch.setattr(listings, "CACHED_FILES", 100)  # ~33 of the nights' 3-file listings
    folder = "s3://bucket/flat"
    nights = 100
    keys = [f"{i:05d}.jpg" for i in range(nights + 2)]

    def shard(sid, members, night):
        return _loose(sid, folder, members, lambda k: f"etag-{k}-night{night}")

    with listings.ListingWriter(str(tmp_path / "out"), None) as writer:
        # night n read the first and last key (so its range spans the folder) and the n-th key; key 0 is read
        # again each night with a new fingerprint (the file changes every night)
        sealed = [
            [writer.compact(shard(f"n{n}", [keys[0], keys[n + 1], keys[-1]], n))] for n in range(nights)
        ]
    covered = listings.CoveredFiles(sealed)
    listed = shard("today", keys, nights - 1)  # today's listing: the files as the last night saw them
    part = covered.new_part(listed, redo=set())
    # key 0 and the last key were read by the last night with today's fingerprints; every middle key by
    # exactly one night n, with night n's fingerprint, which today's listing (night nights-1) differs from
    # except for the last night's own key
    assert part is not None
    assert set(part.members) == {keys[n + 1] for n in range(nights - 1)}
    assert covered.cached_files == sum(len(f) for f in covered.cache.values()) <= 100
    # the same shard again finds the same answer from a cache that now holds only the newest listings
    assert set(covered.new_part(listed, redo=set()).members) == set(part.members)


def test_reading_uncached_listings_never_evicts_the_ones_the_same_shard_needs(tmp_path, monkeypatch):
    """The cache is full of the listings one listed shard needed; the next needs many new ones and one of the
    least recently used cached ones: reading the new ones must not push that one out."""
    from omnilmm_ray import listings

    monkeypatch.setattr(listings, "CACHED_FILES", 20)  # ten of these 2-file listings
    folder = "s3://bucket/flat"

    def shard(sid, members):
        return _loose(sid, folder, members, lambda k: f"etag-{k}")

    late = [shard(f"m{n}", [f"m{n:04d}.jpg", f"z{n:04d}.jpg"]) for n in range(9)]
    wide = shard("wide", ["a0000.jpg", "z9999.jpg"])  # reaches both halves of the folder
    early = [shard(f"a{n}", [f"a{n:04d}.jpg", f"b{n:04d}.jpg"]) for n in range(15)]
    with listings.ListingWriter(str(tmp_path / "out"), None) as writer:
        sealed = [[writer.compact(s)] for s in (*early, wide, *late)]  # runs oldest first
    covered = listings.CoveredFiles(sealed)
    # fills the cache: `wide`, then `late`
    covered.new_part(shard("t1", ["m0000.jpg", "z0000.jpg"]), redo=set())
    assert sealed[len(early)][0].listing in covered.cache and covered.cached_files == 20
    part = covered.new_part(shard("t2", ["a0000.jpg", "a0001.jpg", "b0099.jpg"]), redo=set())
    assert part is not None and part.members == ("b0099.jpg",)
    assert sealed[len(early)][0].listing in covered.cache  # `late` went instead


def test_small_nightly_listings_are_read_once_per_plan(tmp_path, monkeypatch):
    """Many nights of a few new files each in a flat folder: the cache, counted in files, holds all their
    listings, so a plan of several listed shards reads each sealed listing once (counted by the reads)."""
    from omnilmm_ray import listings

    folder = "s3://bucket/flat"
    keys = [f"{i:05d}.jpg" for i in range(2000)]
    nights = 150  # more than a cache of 64 listings held
    with listings.ListingWriter(str(tmp_path / "out"), None) as writer:
        sealed = [
            [writer.compact(_loose(f"n{n}", folder, keys[n::nights], lambda k: "e"))] for n in range(nights)
        ]
    covered = listings.CoveredFiles(sealed)
    reads = []
    real = listings.load_listing
    monkeypatch.setattr(listings, "load_listing", lambda s: reads.append(s.listing) or real(s))
    for i in range(0, len(keys), 500):  # today's plan: four listed shards over the same folder
        listed = _loose(f"t{i}", folder, keys[i : i + 500], lambda k: "e")
        assert covered.new_part(listed, redo=set()) is None
    assert len(reads) == nights == len(set(reads))
