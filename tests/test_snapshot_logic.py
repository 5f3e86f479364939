"""Without Ray: present records (what a run's planning listed), the bookkeeping's names, and the snapshot
through retries and cut shards."""

import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from omnilmm_ray import present, reuse, schema
from omnilmm_ray.commit import ShardCommitter, verify_run
from omnilmm_ray.config import JobConfig
from omnilmm_ray.job import summarize
from omnilmm_ray.listings import ListingWriter
from omnilmm_ray.present import PresentLookup, PresentWriter, diff_present, iter_present
from omnilmm_ray.reuse import ReuseIndex, build_index
from omnilmm_ray.samples import draw, encode, write_tar
from omnilmm_ray.snapshot import publish, snapshot_uri
from omnilmm_ray.sources import Shard, load_listing
from omnilmm_ray.storage import resolve, write_bytes_atomic, write_json, write_parquet_atomic
from omnilmm_ray.table import OutputTable


def tar(uri: str, fp: str = "1") -> Shard:
    return Shard(uri.rsplit("/", 1)[1], "tar", uri, (), {uri: fp})


def files(root: str, names: list[str], fp: str = "1") -> Shard:
    fps = {f"{root}/{n}": fp for n in names}
    return Shard(
        f"f-{names[0]}", "files", root, tuple(names), fps, count=len(names), first=names[0], last=names[-1]
    )


def record(tmp_path, run: str, shards: list[Shard]) -> str:
    with PresentWriter(str(tmp_path), run, None) as w:
        for s in shards:
            w.add(s)
    return w.uri


# Two inputs, listed one after the other; inside the first, a group of loose files is handed over after the
# tars listed among its files (a group is full only later), and one file is named by both inputs.
LISTED = [
    tar("s3://b/x/0001.tar"),
    tar("s3://b/x/0003.tar"),
    files("s3://b/x", ["0000.jpg", "0002.jpg", "0004.jpg"]),
    tar("s3://b/x/0005.tar"),
    files("s3://b/x", ["0006.jpg"]),
    tar("s3://a/y/0.tar"),
    files("s3://a/y", ["1.jpg", "2.jpg"]),
    tar("s3://b/x/0003.tar"),
]


@pytest.mark.parametrize("rows", [2, 65_536])  # several row groups per section, or one
def test_a_record_reads_back_sorted_once_per_file_in_few_sections(tmp_path, monkeypatch, rows):
    monkeypatch.setattr(present, "PRESENT_ROWS", rows)
    uri = record(tmp_path, "r1", LISTED)
    assert uri == f"{tmp_path}/_inputs/r1.listing"
    got = list(iter_present(uri, None))
    want = sorted({(u, fp, s.format == "files") for s in LISTED for u, fp in s.fingerprints.items()})
    assert got == want
    sections = set(pq.read_table(uri).column("section").to_pylist())
    assert len(sections) == 4  # tars and loose files of each input
    lookup = PresentLookup(uri, None, cached=1)
    asked = pa.array(["s3://b/x/0004.jpg", "s3://b/x/0007.jpg", "s3://a/y/0.tar", "s3://a/y/1.jpg", "s3://z"])
    assert lookup.holds(asked).to_pylist() == [True, False, True, True, False]
    lookup.close()


def test_the_difference_of_two_records_in_one_pass(tmp_path):
    before = record(tmp_path, "r1", LISTED)
    after = record(
        tmp_path,
        "r2",
        [
            tar("s3://b/x/0001.tar", "2"),  # changed
            files("s3://b/x", ["0000.jpg", "0004.jpg", "0009.jpg"]),  # 0002 and 0006 gone, 0009 new
            tar("s3://b/x/0005.tar"),
            tar("s3://a/y/0.tar"),
            files("s3://a/y", ["1.jpg", "2.jpg"]),
        ],
    )
    diff = {u: (old and old[1], new and new[1]) for u, old, new in diff_present(before, after, None)}
    assert diff == {
        "s3://b/x/0001.tar": ("1", "2"),
        "s3://b/x/0002.jpg": ("1", None),
        "s3://b/x/0003.tar": ("1", None),
        "s3://b/x/0006.jpg": ("1", None),
        "s3://b/x/0009.jpg": (None, "1"),
    }
    empty = record(tmp_path, "r3", [])
    assert list(iter_present(empty, None)) == []
    assert len(list(diff_present(after, empty, None))) == 8


def test_a_failed_planning_leaves_no_record(tmp_path):
    with pytest.raises(RuntimeError), PresentWriter(str(tmp_path), "r1", None) as w:
        w.add(LISTED[0])
        w._flush(False)
        raise RuntimeError("listing failed")
    assert not list((tmp_path / "_inputs").glob("*"))


def test_listings_and_the_reuse_index_are_not_named_parquet_and_old_names_still_read(tmp_path):
    with ListingWriter(str(tmp_path), None) as w:
        compact = w.compact(files(str(tmp_path / "in"), ["a.jpg", "b.jpg"]))
    assert compact.listing.endswith(".listing") and load_listing(compact).members == ("a.jpg", "b.jpg")
    old = tmp_path / "_files" / "old.parquet"  # a plan written before names its listing so
    (tmp_path / "_files" / compact.listing.rsplit("/", 1)[1]).rename(old)
    assert load_listing(replace(compact, listing=str(old))).members == (
        "a.jpg",
        "b.jpg",
    )
    # a reuse index: written under `.index`; one written before (`.parquet`, no suffix in its manifest) serves
    run = tmp_path / "run=r1"
    rows = [
        {
            "source": "s",
            "key": f"k{i}",
            "sample_index": i,
            "sha256": f"{i:064x}",
            "prompt": "p",
            "caption": f"c{i}",
        }
        for i in range(3)
    ]
    write_parquet_atomic(resolve(str(run))[0], f"{run}/s1.parquet", schema.table(rows, schema.OUTPUT_SCHEMA))
    manifest = build_index(str(run), ["s1"], 3)
    assert [p.name for p in (run / "_reuse").glob("*.*") if p.name != "_index.json"] == ["all.index"]
    q = pa.table({"sha256": [f"{1:064x}"], "prompt": ["p"]})
    assert ReuseIndex([(str(run), 0)]).lookup(q).column("caption").to_pylist() == ["c1"]
    (run / "_reuse" / "all.index").rename(run / "_reuse" / "all.parquet")
    (run / "_reuse" / "_index.json").write_text(
        json.dumps({k: v for k, v in manifest.items() if k != "suffix"})
    )
    plan = {"fingerprint": {"prompt": "p"}, "shards": [{"shard_id": "s1"}]}
    index = reuse.open_index(str(tmp_path), ["r1"], lambda rid: plan)
    assert index.lookup(q).column("caption").to_pylist() == ["c1"]


def _sealed_run(table: OutputTable, cfg: JobConfig, images: dict[str, int], bad=None, stop=None) -> str:
    """Plan a run as the job does (its plan and present record), commit a row for each wanted index of each
    shard (`bad`: name -> {index: error kind}; `stop`: name -> index of a shard-level error after the images
    before it), seal it, publish the snapshot; returns the run id."""
    run = table.open_run(cfg)
    c = ShardCommitter(run.uri, run.shards)
    for s in run.shards:
        name = Path(s.uri).name
        n, end = images[name], (stop or {}).get(name)
        rows = []
        for i in [i for i in range(n if end is None else end) if s.wants(i)]:
            row = {
                "source": s.uri,
                "shard_id": s.shard_id,
                "sample_index": i,
                "key": f"k{i}",
                "sha256": "0" * 64,
            }
            kind = (bad or {}).get(name, {}).get(i)
            rows.append(
                {**row, **(schema.error(kind, "failed") if kind else {"caption": f"{run.run_id} {i}"})}
            )
        if end is not None:
            cut = schema.error("shard_truncated", "cut")
            rows.append({"source": s.uri, "shard_id": s.shard_id, "sample_index": end, **cut})
        marker = {"shard_id": s.shard_id, "sample_index": -1, "shard_rows": n if end is None else end + 1}
        marker["error_kind"] = None if end is None else "shard_truncated"
        c.add(schema.table([*rows, marker], schema.ENGINE_SCHEMA))
    assert not c.uncommitted()
    counts = verify_run(run.uri, run.shards)
    write_json(table.fs, f"{table.path}/run={run.run_id}/_summary.json", summarize(cfg, run, counts, {}))
    write_bytes_atomic(table.fs, f"{table.path}/run={run.run_id}/_SUCCESS", b"")
    assert publish(table)["run"] == run.run_id
    return run.run_id


def _rows(t: pa.Table) -> set[tuple]:
    cols = ["source", "sample_index", "key", "caption", "error_kind", "run"]
    return set(zip(*(t.column(c).to_pylist() for c in cols)))


def test_the_snapshot_follows_retries_and_cut_shards_as_the_latest_view_does(tmp_path):
    """Each night published incrementally holds what the latest view holds for the images present: rows
    retried alone replace theirs, a cut shard's row goes once it is read again from there, even where
    the shard turns out to end at the cut (no row comes at that index)."""
    inputs = tmp_path / "in"
    images = {"a.tar": 5, "b.tar": 5, "c.tar": 4}
    for name, n in images.items():
        write_tar(inputs / name, [(f"{name}{i}", {"jpg": encode(draw(i)[0])}) for i in range(n)])
    cfg = JobConfig(inputs=[str(inputs)], output=str(tmp_path / "out"), engine={"backend": "fake"})
    table = OutputTable(cfg.output)
    modes = []

    def check():
        d = DeltaTable(snapshot_uri(cfg.output))
        modes.append(d.history(1)[0]["omnilmm_publish"])
        snap, latest = d.to_pyarrow_table(), table.read_latest()
        present = {str(p) for p in inputs.iterdir()}
        latest = latest.filter(pc.is_in(latest.column("source"), pa.array(sorted(present))))
        assert _rows(snap) == _rows(latest)
        return snap

    _sealed_run(table, cfg, images, bad={"a.tar": {1: "engine_error"}}, stop={"b.tar": 2, "c.tar": 4})
    assert len(check()) == 5 + 3 + 5  # b: 2 images and its cut row; c: 4 images and a cut row after them
    # a's row 1 again; b from 2 on, cut again at 4; c from 4 on, where nothing comes: its cut row goes
    _sealed_run(table, cfg, images, stop={"b.tar": 4})
    keyless = check().filter(pc.is_null(pc.field("key")))
    assert keyless.column("source").to_pylist() == [str(inputs / "b.tar")]
    _sealed_run(table, cfg, images)  # b from 4 on
    assert len(check()) == 14
    (inputs / "a.tar").unlink()
    _sealed_run(table, cfg, images)
    assert len(check()) == 9 and modes == ["full", "incremental", "incremental", "incremental"]
