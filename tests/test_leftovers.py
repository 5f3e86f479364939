"""What kills leave behind (temporary files, a run folder without its plan) is tidied by the next job."""

import datetime as dt
import json
import logging
from pathlib import Path

import pytest

from omnilmm_ray import cli
from omnilmm_ray.report import history
from omnilmm_ray.samples import build_samples
from omnilmm_ray.table import OutputTable


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def plant(out: Path, sealed: str, killed: str) -> None:
    """Leftovers of kills: inside a sealed run's index writes and a shard write, inside the first write of a
    later run's plan, of a listing and of a precheck."""
    for name in (
        f"run={sealed}/_reuse/.tmp-0a-all.parquet",
        f"run={sealed}/_reuse/.tmp-0b-_index.json",
        f"run={sealed}/.tmp-0c-s.parquet",
        f"run={killed}/.tmp-0d-_plan.json",
        "_files/.tmp-0e-f.parquet",
        "_probe-0f",
    ):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"half a file")


def sealed_run(out: Path, rid: str) -> None:
    run = out / f"run={rid}"
    run.mkdir(parents=True)
    (run / "_plan.json").write_text(json.dumps({"run_id": rid, "fingerprint": {}, "shards": []}))
    (run / "_summary.json").write_text(json.dumps({"rows": 0, "counts": {}}))
    (run / "_SUCCESS").write_bytes(b"")
    (run / "_reuse").mkdir()
    (run / "_reuse" / "_index.json").write_text("{}")


def test_the_lease_holder_removes_temporary_files_at_any_depth_and_runs_without_a_plan(tmp_path, caplog):
    out = tmp_path
    sealed_run(out, "20260101T000000000000Z")
    plant(out, "20260101T000000000000Z", "20260102T000000000000Z")
    (out / "run=20260103T000000000000Z").mkdir()
    (out / "run=20260103T000000000000Z" / "notes.txt").write_text("no plan, but not a temporary file")
    (out / ".tmp-10-_lock.json").write_text("{")  # a lease write's: lease.py removes it under its lock
    gone = OutputTable(str(out)).remove_leftovers()
    assert tree(out) == [
        ".tmp-10-_lock.json",
        "run=20260101T000000000000Z/_SUCCESS",
        "run=20260101T000000000000Z/_plan.json",
        "run=20260101T000000000000Z/_reuse/_index.json",
        "run=20260101T000000000000Z/_summary.json",
        "run=20260103T000000000000Z/notes.txt",  # not ours to delete: reports ignore it, a warning names it
    ]
    assert not (out / "run=20260102T000000000000Z").exists() and len(gone) == 7
    assert "run=20260103T000000000000Z has no _plan.json" in caplog.text


def test_report_lists_no_run_without_a_plan(tmp_path):
    sealed_run(tmp_path, "20260101T000000000000Z")
    plant(tmp_path, "20260101T000000000000Z", "20260102T000000000000Z")
    assert [r["run"] for r in history(str(tmp_path))] == ["20260101T000000000000Z"]


@pytest.mark.integration
def test_the_next_job_removes_what_kills_left(ray_local, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="omnilmm_ray.job")
    inp, out = tmp_path / "in", tmp_path / "out"
    build_samples(inp, shards=1, per_shard=4)
    args = ["--input", str(inp / "webdataset"), "--output", str(out), "--engine", "fake"]
    assert cli.main(args) == 0
    (sealed,) = [p.name[4:] for p in out.glob("run=*")]
    killed = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    plant(out, sealed, killed)
    assert cli.main(args) == 0  # nothing new to caption: a new run with no shards
    assert not [f for f in tree(out) if "/.tmp-" in f or f.startswith((".tmp-", "_probe-"))], tree(out)
    assert not (out / f"run={killed}").exists()
    assert not [p for p in out.glob("run=*/**/*.parquet") if p.name.startswith(".")]
    assert killed not in [r["run"] for r in history(str(out))]
    assert "removed 7 temporary file(s) or empty run folder(s)" in caplog.text
