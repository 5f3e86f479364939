"""Nightly incremental runs over a growing input, and object-store faults on the local S3 server."""

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.dataset as pads
import pytest
import yaml

from omnilmm_ray import cli
from omnilmm_ray.samples import build_samples, draw, encode, write_tar
from omnilmm_ray.table import OutputTable
from tests.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.integration


def run(args, tmp_path, **cfg):
    f = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return cli.main(["--config", str(f), *args])


def test_nightly_reads_only_new_or_changed_shards_and_reuses_known_bytes(ray_local, tmp_path):
    inputs, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls.log"
    build_samples(inputs, shards=3, per_shard=5)
    engine = {"backend": "fake", "fake_calls_log": str(calls)}
    args = ["--input", str(inputs / "webdataset"), "--output", str(out)]
    assert run(args, tmp_path, engine=engine) == 0
    first = int(sum(int(x) for x in calls.read_text().split()))
    # 15 images, two of them drawn alike: the same bytes reach the engine once a night
    assert first == len({r["sha256"] for r in OutputTable(str(out)).read_latest().to_pylist()}) == 14

    # night 2: a new shard (one image re-uploaded from shard 0, one new) and shard 1 changed (one image added)
    old = inputs / "webdataset" / "00000.tar"
    import tarfile

    with tarfile.open(old) as t:
        reupload = t.extractfile("000000000.jpg").read()
    write_tar(
        inputs / "webdataset" / "00003.tar",
        [("dup", {"jpg": reupload}), ("new", {"jpg": encode(draw(500, size=(300, 200))[0])})],
    )
    with tarfile.open(inputs / "webdataset" / "00001.tar") as t:
        members = [(m.name.split(".")[0], m.name.split(".", 1)[1], t.extractfile(m).read()) for m in t]
    samples: dict = {}
    for key, ext, data in members:
        samples.setdefault(key, {})[ext] = data
    samples["added"] = {"jpg": encode(draw(501, size=(310, 200))[0])}
    write_tar(inputs / "webdataset" / "00001.tar", list(samples.items()))
    calls.write_text("")
    assert run(args, tmp_path, engine=engine) == 0

    table = OutputTable(str(out))
    runs = table.sealed_runs()
    assert len(runs) == 2
    plan = table.plan_of(runs[1])
    assert sorted(Path(s["uri"]).name for s in plan["shards"]) == ["00001.tar", "00003.tar"]
    t2 = pads.dataset(str(out / f"run={runs[1]}"), format="parquet").to_table()
    rows = {r["key"]: r for r in t2.to_pylist()}
    assert rows["dup"]["cached"] and rows["dup"]["caption"]  # re-uploaded bytes: no GPU pass
    assert not rows["new"]["cached"] and not rows["added"]["cached"]
    assert sum(int(x) for x in calls.read_text().split()) == 2  # only "new" and "added" reached the engine
    summary = json.loads((out / f"run={runs[1]}" / "_summary.json").read_text())
    assert summary["counts"]["cached"] == 6 - 1 + 1  # 5 unchanged images of shard 1 + the re-upload

    latest = table.read_latest()
    assert latest.num_rows == 15 + 3  # one row per (source, key): 15 + "added" + "dup" + "new"
    shard1 = [r for r in latest.to_pylist() if r["source"].endswith("00001.tar")]
    assert len(shard1) == 6 and {r["run"] for r in shard1} == {runs[1]}

    import subprocess
    import sys

    from tests.conftest import ROOT

    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "latest.py"),
            "--output",
            str(out),
            "--to",
            str(tmp_path / "latest.parquet"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert pads.dataset(str(tmp_path / "latest.parquet")).count_rows() == 18

    # night 3: nothing new -> an empty run, nothing read
    calls.write_text("")
    assert run(args, tmp_path, engine=engine) == 0
    assert table.plan_of(table.sealed_runs()[-1])["shards"] == [] and calls.read_text() == ""


def _put(s3, local, bucket):
    s3.mkdir(bucket)
    s3.put(str(local) + "/", f"{bucket}/in/", recursive=True)


def test_transient_s3_faults_are_retried(ray_local, s3, s3_endpoint, tmp_path, monkeypatch):
    from omnilmm_ray import snapshot

    # A publish cut off by a fault starts over after a backoff (1, 2, 4, ... s): the attempts are what this
    # test checks, so they follow each other at once.
    slept = []
    monkeypatch.setattr(snapshot, "time", SimpleNamespace(sleep=slept.append))
    build_samples(tmp_path / "in", shards=3, per_shard=6)
    _put(s3, tmp_path / "in", "faulty-in")
    s3.mkdir("faulty-out")
    # The job makes few requests per shard, so faults are dense enough to hit every kind of request.
    # in its own process: the snapshot's commits go through it too (faulty_proxy.py says why)
    with FaultyProxy(s3_endpoint, fail_every=5, drop_every=3, process=True) as proxy:
        opts = {"endpoint_url": proxy.url}
        rc = run(
            [
                "--input",
                "s3://faulty-in/in/webdataset",
                "--input",
                "s3://faulty-in/in/files",
                "--output",
                "s3://faulty-out/t",
            ],
            tmp_path,
            engine={"backend": "fake"},
            input={"storage_options": opts},
            sink={"storage_options": opts},
        )
    assert rc == 0
    assert proxy.injected["503"] > 5 and proxy.injected["drop"] > 3, proxy.injected
    run_dir = next(p for p in s3.ls("faulty-out/t") if "run=" in p)
    t = pads.dataset(run_dir, filesystem=s3, format="parquet").to_table()
    assert t.num_rows == 3 * 6 + 3 and t.column("error").null_count == t.num_rows
    print("injected faults:", proxy.injected, "publish attempts cut off:", len(slept))


@pytest.mark.parametrize("policy", ["error_rows", "fail"])
def test_a_shard_that_stays_unreadable(ray_local, s3, s3_endpoint, tmp_path, policy, capsys):
    build_samples(tmp_path / "in", shards=2, per_shard=4)
    bucket = f"broken-{policy.replace('_', '-')}"
    _put(s3, tmp_path / "in", bucket)
    with FaultyProxy(s3_endpoint, broken="00001.tar") as proxy:
        opts = {"endpoint_url": proxy.url}
        # The client tries a GET twice rather than botocore's default 5 times with backoff (~6 s a read):
        # whether its retries or the job's read attempts give up, the shard stays unreadable.
        client_retries = {"config_kwargs": {"retries": {"max_attempts": 1}}}
        rc = run(
            ["--input", f"s3://{bucket}/in/webdataset", "--output", f"s3://{bucket}/out"],
            tmp_path,
            engine={"backend": "fake"},
            input={
                "storage_options": {**opts, **client_retries},
                "on_unreadable_shard": policy,
                "read_attempts": 1,
            },
            sink={"storage_options": opts},
        )
    assert proxy.injected["broken"] > 0
    err = capsys.readouterr().err
    if policy == "fail":
        assert rc == 1 and f"s3://{bucket}/in/webdataset/00001.tar" in err
        return
    assert rc == 3 and "1 shard(s) could not be read to their end (sink.max_failed_shards=0)" in err
    run_dir = next(p for p in s3.ls(f"{bucket}/out") if "run=" in p)
    t = pads.dataset(run_dir, filesystem=s3, format="parquet").to_table()
    bad = [r for r in t.to_pylist() if r["source"].endswith("00001.tar")]
    assert [r["error_kind"] for r in bad] == ["shard_unreadable"]
    assert sum(1 for r in t.to_pylist() if r["source"].endswith("00000.tar") and r["caption"]) == 4
