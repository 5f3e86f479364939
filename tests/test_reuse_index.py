"""The reuse index: built at seal time, split by sha256 prefix, looked up in batches; survives a crash
between the last shard commit and the seal; built once for runs sealed without one."""

import hashlib
import shutil

import pyarrow as pa
import pytest
import yaml

from omnilmm_ray import cli, job, reuse, schema
from omnilmm_ray.reuse import ReuseIndex, build_index
from omnilmm_ray.samples import draw, encode, write_tar
from omnilmm_ray.storage import resolve, write_parquet_atomic
from omnilmm_ray.table import OutputTable


def _sha(s: int, i: int) -> str:
    return hashlib.sha256(f"{s}-{i}".encode()).hexdigest()


def _run_dir(tmp_path, shards=6, per_shard=200):
    """A run's shard files: every 7th row an error, prompt 'p' (shard 5: prompt 'q')."""
    fs, _ = resolve(str(tmp_path))
    for s in range(shards):
        rows = [
            {
                "source": f"src{s}",
                "key": str(i),
                "sample_index": i,
                "caption": None if i % 7 == 0 else f"cap {s} {i}",
                "error": "engine_error: x" if i % 7 == 0 else None,
                "sha256": _sha(s, i),
                "prompt": "q" if s == 5 else "p",
                "input_tokens": i,
            }
            for i in range(per_shard)
        ]
        write_parquet_atomic(fs, f"{tmp_path}/sh{s}.parquet", schema.table(rows, schema.OUTPUT_SCHEMA))
    return [f"sh{s}" for s in range(shards)]


def test_index_split_by_prefix_and_built_in_passes_answers_like_a_full_scan(tmp_path, monkeypatch):
    monkeypatch.setattr(reuse, "ROWS_PER_FILE", 100)  # 16 files per prefix digit...
    monkeypatch.setattr(reuse, "BUILD_ROWS", 300)  # ...built in several passes...
    monkeypatch.setattr(reuse, "ROW_GROUP", 8)  # ...with many row groups to skip
    ids = _run_dir(tmp_path)
    manifest = build_index(str(tmp_path), ids, 1200)
    assert manifest["prefix_chars"] == 1 and len(manifest["files"]) == 16
    assert manifest["rows"] == 6 * (200 - 29)  # errors are not indexed
    asked = [(s, i, p) for s in range(7) for i in range(0, 200, 3) for p in ("p", "q")]
    q = pa.table(
        {"sha256": [_sha(s, i) for s, i, _ in asked] + [None], "prompt": [p for *_, p in asked] + ["p"]}
    )
    hits = {(r["sha256"], r["prompt"]): r for r in ReuseIndex([(str(tmp_path), 1)]).lookup(q).to_pylist()}
    want = {
        (_sha(s, i), p): f"cap {s} {i}"
        for s, i, p in asked
        if s < 6 and i % 7 and p == ("q" if s == 5 else "p")
    }
    assert {k: r["caption"] for k, r in hits.items()} == want
    assert hits[(_sha(1, 3), "p")]["input_tokens"] == 3


def _job(tmp_path, inputs, out, calls, **cfg):
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump({"engine": {"backend": "fake", "fake_calls_log": str(calls)}, **cfg}))
    calls.write_text("")
    code = cli.main(["--config", str(f), "--input", str(inputs), "--output", str(out)])
    return code, sum(int(x) for x in calls.read_text().split())


@pytest.mark.integration
def test_reuse_serves_a_reupload_after_a_crash_between_commit_and_seal(ray_local, tmp_path, monkeypatch):
    inputs, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls.log"
    images = [encode(draw(i, size=(160, 120))[0]) for i in range(4)]
    write_tar(inputs / "a.tar", [(f"k{i}", {"jpg": im}) for i, im in enumerate(images)])

    def crash_at_seal(name):  # the process dies after every shard is committed, before the seal
        if name == "seal":
            raise RuntimeError("killed")

    monkeypatch.setattr(job, "kill_point", crash_at_seal)
    assert _job(tmp_path, inputs, out, calls) == (1, 4)
    monkeypatch.undo()
    table = OutputTable(str(out))
    assert table.sealed_runs() == [] and not list(out.glob("run=*/_reuse"))
    assert _job(tmp_path, inputs, out, calls) == (0, 0)  # resumed: all committed, now sealed
    (first,) = table.sealed_runs()
    assert (out / f"run={first}" / "_reuse" / "_index.json").exists()

    # night 2: image 1 re-uploaded under another name, and one new image
    write_tar(inputs / "b.tar", [("again", {"jpg": images[1]}), ("new", {"jpg": encode(draw(9)[0])})])
    assert _job(tmp_path, inputs, out, calls) == (0, 1)
    rows = {r["key"]: r for r in table.read_latest().to_pylist()}
    assert rows["again"]["cached"] and rows["again"]["caption"] == rows["k1"]["caption"]
    assert not rows["new"]["cached"]

    # an output whose runs were sealed before the index existed: built once, then served the same way
    for run in table.sealed_runs():
        shutil.rmtree(out / f"run={run}" / "_reuse")
    write_tar(inputs / "c.tar", [("third", {"jpg": images[2]}), ("fourth", {"jpg": images[3]})])
    assert _job(tmp_path, inputs, out, calls) == (0, 0)
    assert all((out / f"run={r}" / "_reuse" / "_index.json").exists() for r in table.sealed_runs())
    rows = {r["key"]: r for r in table.read_latest().to_pylist()}
    assert rows["third"]["cached"] and rows["fourth"]["cached"]
