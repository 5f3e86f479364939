"""The snapshot (`OUTPUT/captions`, a Delta Lake table): one row per image present in the inputs, one commit
per night, readable by ordinary tools; kills while publishing leave one night's snapshot."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from omnilmm_ray import cli, job
from omnilmm_ray.samples import draw, encode, write_tar
from omnilmm_ray.storage import resolve
from omnilmm_ray.table import OutputTable
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

# What a reader knows of the table, without this package: where it is, and the app id of its commits. (The
# package's own modules are imported inside the tests that change them, so that each test fails by itself,
# on its assertion, where they do not exist.)
APP_ID = "omnilmm-caption"


def snapshot_uri(out: str) -> str:
    return f"{out}/captions"


def delta_options(uri: str) -> dict:
    """What a reader on the local S3 server gives deltalake."""
    if not uri.startswith("s3://"):
        return {}
    return {
        "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"],
        "AWS_ALLOW_HTTP": "true",
        "AWS_REGION": "us-east-1",
    }


class Inputs:
    """Input tars and loose images on local disk, mirrored to a bucket on the local S3 server for `s3`, with
    the number of images each holds: what a snapshot must count."""

    def __init__(self, root: Path, s3=None, bucket: str = ""):
        self.root, self.s3, self.bucket = root, s3, bucket
        self.images: dict[str, int] = {}
        self.seed = 0
        if s3 is not None:
            s3.mkdir(bucket)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/in" if self.s3 is not None else str(self.root)

    def _sync(self, rel: str) -> None:
        if self.s3 is not None:
            local, remote = self.root / rel, f"{self.bucket}/in/{rel}"
            if local.exists():
                self.s3.put_file(str(local), remote)
            elif self.s3.exists(remote):
                self.s3.rm_file(remote)

    def tar(self, name: str, n: int) -> list[bytes]:
        """Write (or overwrite) a tar of `n` new images; returns their bytes."""
        ims = [encode(draw(self.seed + i, size=(64, 48))[0]) for i in range(n)]
        self.seed += n
        write_tar(self.root / f"{name}.tar", [(f"{name}-{i}", {"jpg": b}) for i, b in enumerate(ims)])
        self.images[f"{name}.tar"] = n
        self._sync(f"{name}.tar")
        return ims

    def file(self, rel: str) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(encode(draw(self.seed, size=(64, 48))[0]))
        self.seed += 1
        self.images[rel] = 1
        self._sync(rel)

    def remove(self, rel: str) -> None:
        (self.root / rel).unlink()
        del self.images[rel]
        self._sync(rel)

    def count(self) -> int:
        return sum(self.images.values())


def night(inputs: Inputs, out: str) -> int:
    return cli.main(["--input", inputs.uri, "--output", out, "--engine", "fake", "--batch-size", "8"])


def snapshot(out: str, version: int | None = None) -> DeltaTable:
    uri = snapshot_uri(out)
    return DeltaTable(uri, version=version, storage_options=delta_options(uri))


def published_run(d: DeltaTable) -> str:
    """The run whose publish made this version (the commit info, as a reader of the table sees it)."""
    return d.history(1)[0]["omnilmm_run"]


def sealed_runs(out: str) -> list[str]:
    return OutputTable(out).sealed_runs()


@pytest.mark.parametrize("store", ["local", "s3"])
def test_snapshot_holds_one_row_per_image_present_as_shards_shrink_change_and_go(
    ray_local, s3, tmp_path, store
):
    inputs = Inputs(tmp_path / "in", s3 if store == "s3" else None, f"snap-{os.getpid()}")
    out = f"s3://{inputs.bucket}/out" if store == "s3" else str(tmp_path / "out")
    for name in ("a", "b", "c"):
        inputs.tar(name, 8)
    for i in range(4):
        inputs.file(f"album{i % 2}/photo{i}.jpg")
    counts = []

    def check():
        d = snapshot(out)
        t = d.to_pyarrow_table()
        assert t.num_rows == inputs.count(), (t.num_rows, inputs.images)
        assert len(pc.unique(t.column("image_id"))) == t.num_rows
        runs = sealed_runs(out)
        assert published_run(d) == runs[-1] and set(t.column("run").to_pylist()) <= set(runs)
        assert json.loads(t.column("settings")[0].as_py())["prompt"]  # the settings that made the row
        counts.append((d.version(), t.num_rows))
        return t

    assert night(inputs, out) == 0
    check()
    # night 2: shard b shrinks from 8 to 5 images, a loose file goes
    inputs.tar("b", 5)
    inputs.remove("album0/photo0.jpg")
    assert night(inputs, out) == 0
    check()
    # night 3: shard a is overwritten with other images: the same count, the new images' rows
    new_a = inputs.tar("a", 8)
    assert night(inputs, out) == 0
    t = check()
    rows_a = t.filter(pc.ends_with(t.column("shard"), "/a.tar"))
    assert sorted(rows_a.column("sha256").to_pylist()) == sorted(hashlib.sha256(b).hexdigest() for b in new_a)
    # night 4: shard c and another loose file are deleted, a new shard d comes
    inputs.remove("c.tar")
    inputs.remove("album1/photo1.jpg")
    inputs.tar("d", 4)
    assert night(inputs, out) == 0
    check()
    assert [n for _, n in counts] == [28, 24, 24, 19]
    # time travel: every night's version still reads as that night
    for version, n in counts:
        assert snapshot(out, version).to_pyarrow_table().num_rows == n
    # the job's bookkeeping is not found by a glob for Parquet files: only run= rows and the table's files
    fs, path = resolve(out)
    found = [p[len(path) + 1 :] for p in fs.glob(f"{path}/**/*.parquet")]
    assert found and all(p.startswith(("run=", "captions/part-")) for p in found), found
    assert not [p for p in found if "/_" in p or p.startswith("_")], found
    assert fs.glob(f"{path}/run=*/_reuse/*.index") and fs.glob(f"{path}/_files/*.listing")
    # only the published run's present record is kept: no publish reads an older one
    assert [p.rsplit("/", 1)[1] for p in fs.glob(f"{path}/_inputs/*")] == [f"{sealed_runs(out)[-1]}.listing"]


def test_a_parquet_glob_of_the_output_finds_no_bookkeeping(ray_local, tmp_path):
    """DuckDB or pyarrow over `OUTPUT/**/*.parquet` take every such file for captions: the reuse index and the
    loose-file listings are named otherwise (an old output's `.parquet` ones are still read)."""
    inputs = Inputs(tmp_path / "in")
    inputs.tar("a", 4)
    inputs.file("loose/x.jpg")
    out = tmp_path / "out"
    assert night(inputs, str(out)) == 0
    found = sorted(str(p.relative_to(out)) for p in out.glob("**/*.parquet"))
    assert [p for p in found if p.startswith("run=")], found  # the log's shard files
    bookkeeping = [p for p in found if not p.startswith(("run=", "captions/part-")) or "/_" in p]
    assert not bookkeeping, bookkeeping
    assert list(out.glob("run=*/_reuse/*.index")) and list(out.glob("_files/*.listing"))


def test_ray_data_and_pandas_read_the_snapshot(ray_local, tmp_path):
    import ray

    inputs = Inputs(tmp_path / "in")
    inputs.tar("a", 6)
    out = str(tmp_path / "out")
    assert night(inputs, out) == 0
    uri = snapshot_uri(out)
    assert ray.data.read_delta(uri).count() == 6
    assert len(DeltaTable(uri).to_pandas()) == 6


def test_a_night_rewrites_only_the_data_files_its_changes_touch(ray_local, tmp_path, monkeypatch):
    from omnilmm_ray import deltafiles

    monkeypatch.setattr(deltafiles, "FILE_ROWS", 8)  # one file per shard of 8
    monkeypatch.setattr(deltafiles, "MIN_ROWS", 1)
    inputs = Inputs(tmp_path / "in")
    for name in "abcdef":
        inputs.tar(name, 8)
    out = str(tmp_path / "out")
    assert night(inputs, out) == 0
    files = data_files(snapshot(out))
    assert len(files) == 6
    inputs.tar("c", 5)  # changed: its file is rewritten
    inputs.tar("g", 8)  # new: a new file
    assert night(inputs, out) == 0
    d = snapshot(out)
    assert d.history(1)[0]["omnilmm_publish"] == "incremental"
    now = data_files(d)
    assert [files[p]["min.shard"].rsplit("/", 1)[1] for p in files.keys() - now.keys()] == ["c.tar"]
    added = sorted(
        (now[p]["min.shard"].rsplit("/", 1)[1], now[p]["num_records"]) for p in now.keys() - files.keys()
    )
    assert added == [("c.tar", 5), ("g.tar", 8)]
    assert d.to_pyarrow_table().num_rows == 6 * 8 - 3 + 8


def data_files(d: DeltaTable) -> dict[str, dict]:
    return {a["path"]: a for a in pa.table(d.get_add_actions(flatten=True)).to_pylist()}


def _publish_killed_at(out: str, point: str) -> None:
    """Publish the newest sealed run in a process of its own, SIGKILLed at `point` (faults.kill_point)."""
    code = "from omnilmm_ray.snapshot import publish; from omnilmm_ray.table import OutputTable; "
    code += f"publish(OutputTable({out!r}))"
    p = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "OMNILMM_KILL_AT": point, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # the drill kills its whole process group
        capture_output=True,
        text=True,
    )
    assert p.returncode == -9, p.stderr[-2000:]


@pytest.mark.parametrize("first", [True, False], ids=["first-publish", "nightly"])
@pytest.mark.parametrize("point", ["sealed", "publish", "publish-files"])
def test_a_kill_while_publishing_leaves_one_nights_snapshot_and_the_next_job_finishes(
    ray_local, tmp_path, monkeypatch, point, first
):
    inputs = Inputs(tmp_path / "in")
    for name in ("a", "b"):
        inputs.tar(name, 6)
    inputs.file("loose/x.jpg")
    out = str(tmp_path / "out")
    if not first:
        assert night(inputs, out) == 0
        inputs.tar("b", 4)
        inputs.remove("loose/x.jpg")
    last = None if first else snapshot(out).to_pyarrow_table().num_rows
    # the night's job is killed right after its seal: the run is sealed, the snapshot is last night's
    with monkeypatch.context() as m:
        m.setattr(job, "publish", lambda table, guard=None: None)
        assert night(inputs, out) == 0
    tonight = sealed_runs(out)[-1]
    if point != "sealed":
        _publish_killed_at(out, point)
    uri = snapshot_uri(out)
    if first:
        assert not DeltaTable.is_deltatable(uri)
    else:
        d = snapshot(out)
        assert published_run(d) != tonight and d.to_pyarrow_table().num_rows == last
    # the next job publishes the sealed run first, then its own (nothing new)
    assert night(inputs, out) == 0
    d = snapshot(out)
    assert d.to_pyarrow_table().num_rows == inputs.count()
    versions = {h["omnilmm_run"]: h["version"] for h in d.history()}
    assert snapshot(out, versions[tonight]).to_pyarrow_table().num_rows == inputs.count()
    assert d.transaction_version(APP_ID) is not None
    # what the killed publish wrote and never committed is gone
    named = {os.path.basename(f) for v in versions.values() for f in snapshot(out, v).file_uris()}
    written = {p.name for p in Path(uri).glob("part-*")}
    assert written == named


def test_a_failed_publish_fails_the_job_and_the_rerun_publishes(ray_local, tmp_path, monkeypatch, capsys):
    inputs = Inputs(tmp_path / "in")
    inputs.tar("a", 5)
    out = str(tmp_path / "out")

    from omnilmm_ray import deltafiles
    from omnilmm_ray import snapshot as publishing

    def refuse(*a, **k):
        raise OSError("the store refused the commit (test)")

    slept = []
    with monkeypatch.context() as m:
        m.setattr(deltafiles.DataFiles, "commit", refuse)
        # the backoff between publish attempts (1 + 2 + ... + 30 s = 91 s in all) is recorded, not waited
        m.setattr(publishing, "time", SimpleNamespace(sleep=slept.append))
        assert night(inputs, out) == 1
    assert len(slept) == publishing.PUBLISH_ATTEMPTS - 1, slept  # it gave up after its last attempt
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "snapshot" in last and "rerun the same command to publish it" in last and last.endswith("[exit 1]")
    (rid,) = sealed_runs(out)  # sealed, never unsealed
    assert not DeltaTable.is_deltatable(snapshot_uri(out))
    assert night(inputs, out) == 0
    d = DeltaTable(snapshot_uri(out))
    assert d.to_pyarrow_table().num_rows == 5 and rid in {h.get("omnilmm_run") for h in d.history()}
