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
from omnilmm_ray.sources import iter_shards, load_listing, plan_shards
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
