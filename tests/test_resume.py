"""Exactly-once under crashes: SIGKILL the whole job at many points, rerun, count every row."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from omnilmm_ray import cli
from omnilmm_ray.samples import build_samples, draw, encode, write_tar
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHARDS, PER_SHARD = 8, 12


def job_cmd(inputs, out, calls_log):
    cfg = Path(calls_log).with_suffix(".yaml")
    cfg.write_text(
        yaml.safe_dump(
            {
                "engine": {"backend": "fake", "fake_delay_s": 0.15, "fake_calls_log": str(calls_log)},
                "scale": {"batch_size": 4},
                "sink": {"commit_rows": 4},
            }
        )
    )
    return [
        sys.executable,
        str(ROOT / "jobs" / "caption.py"),
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--config",
        str(cfg),
    ]


def start(cmd, env_extra):
    env = {**os.environ, **env_extra}
    return subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def shard_files(out, parts=False):
    """Committed files -> mtime: whole shards, or (parts=True) the part files of shards in progress. Not the
    temporary file of a write the kill interrupted (`.tmp-…`: the next attempt removes it, load_progress)."""
    files = {
        p.name: p.stat().st_mtime_ns for p in Path(out).glob("run=*/*.parquet") if not p.name.startswith(".")
    }
    return {k: v for k, v in files.items() if (".part-" in k) == parts}


def test_sigkill_at_many_points_then_rerun_gives_exactly_one_row_per_image(ray_local, tmp_path):
    import ray

    build_samples(tmp_path / "in", shards=SHARDS, per_shard=PER_SHARD)
    inputs, out, calls = tmp_path / "in" / "webdataset", tmp_path / "out", tmp_path / "calls.log"
    # `cluster`: the driver dies and the cluster lives on (as under `ray job submit`); `own_ray`: the job
    # started Ray itself, and the kill takes its whole process group, Ray included. Both kinds of kill land
    # while the pipeline runs; before it starts and once it is over (verify, seal) Ray holds nothing of the
    # job's, so those kills, and the rerun, use the running cluster (a Ray of its own costs seconds of CPU).
    cluster = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    own_ray = {"RAY_ADDRESS": "local"}
    kills = [
        ("lease", cluster),
        ("plan", own_ray),
        ("timed", own_ray),
        ("part:2", cluster),
        ("commit:1", cluster),
        ("commit:2", own_ray),
        ("verify", cluster),
        ("seal", cluster),
    ]
    history = []
    for point, env in kills:
        before, parts_before = shard_files(out), shard_files(out, parts=True)
        env = dict(env, **({} if point == "timed" else {"OMNILMM_KILL_AT": point}))
        p = start(job_cmd(inputs, out, calls), env)
        if point == "timed":  # from outside, mid-batch: as soon as one more shard lands
            deadline = time.time() + 120
            while len(shard_files(out)) <= len(before) and time.time() < deadline and p.poll() is None:
                time.sleep(0.05)
            time.sleep(0.1)
            os.killpg(p.pid, signal.SIGKILL)
        rc = p.wait(timeout=180)
        assert rc == -signal.SIGKILL, (
            f"{point}: job was not killed (rc={rc}): {p.stderr.read().decode()[-2000:]}"
        )
        after, parts_after = shard_files(out), shard_files(out, parts=True)
        # committed shards are never rewritten: same files, same mtimes; a part is never rewritten either
        # (it only disappears once merged into its shard's file)
        assert {k: v for k, v in after.items() if k in before} == before, point
        assert all(parts_after[k] == v for k, v in parts_before.items() if k in parts_after), point
        history.append((point, len(after)))
    assert history[-1][1] == SHARDS, history  # the last two kills happened after every shard was committed
    assert not list(out.glob("run=*/_SUCCESS"))

    p = start(job_cmd(inputs, out, calls), cluster)
    assert p.wait(timeout=180) == 0, p.stderr.read().decode()[-3000:]
    runs = sorted(out.glob("run=*"))
    assert len(runs) == 1, "every rerun resumed the same run"
    t = pads.dataset(str(runs[0]), format="parquet").to_table()
    keys = [(r["source"], r["sample_index"]) for r in t.select(["source", "sample_index"]).to_pylist()]
    assert len(keys) == SHARDS * PER_SHARD and len(set(keys)) == len(keys)  # 0 lost, 0 duplicated
    summary = json.loads((runs[0] / "_summary.json").read_text())
    assert summary["this_attempt"]["shards_committed_before"] == SHARDS
    assert summary["this_attempt"]["rows_processed"] == 0
    engine_images = sum(int(x) for x in calls.read_text().split())
    print(
        f"kill points {[h[0] for h in history]}; shards committed after each {[h[1] for h in history]}; "
        f"images captioned {engine_images} for {len(keys)} rows "
        f"(recomputed share {(engine_images - len(keys)) / len(keys):.2f})"
    )


def _config(tmp_path, **engine):
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump({"engine": {"backend": "fake", **engine}, "scale": {"batch_size": 4}}))
    return str(f)


def test_actor_crash_at_batch_n_loses_and_duplicates_nothing(ray_local, tmp_path):
    build_samples(tmp_path / "in", shards=3, per_shard=10)
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "--config",
                _config(tmp_path, fake_crash_at_batch=3),
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    run = next(out.glob("run=*"))
    assert (run / "_drill_crashed").exists(), "the drill did crash an actor"
    t = pads.dataset(str(run), format="parquet").to_table()
    keys = [(r["source"], r["key"]) for r in t.to_pylist()]
    assert len(keys) == 3 * 10 + 10 + 5 and len(set(keys)) == len(keys)
    assert t.column("error").null_count == t.num_rows


def test_image_that_kills_engines_repeatedly_becomes_an_error_row(ray_local, tmp_path):
    build_samples(tmp_path / "in", shards=1, per_shard=6)
    poison = encode(draw(99, size=(333, 111))[0])
    write_tar(
        tmp_path / "in" / "webdataset" / "poison.tar",
        [(f"p{i}", {"jpg": poison if i == 2 else encode(draw(i)[0])}) for i in range(6)],
    )
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "--config",
                _config(tmp_path, fake_crash_on_size=[333, 111]),
                "--input",
                str(tmp_path / "in" / "webdataset"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    t = pads.dataset(str(next(out.glob("run=*"))), format="parquet").to_table()
    rows = {r["key"]: r for r in t.to_pylist()}
    assert len(rows) == 12
    assert rows["p2"]["error_kind"] == "engine_crash" and rows["p2"]["caption"] is None
    assert all(r["caption"] for k, r in rows.items() if k != "p2")


def test_error_budget_fails_loudly_after_committing(ray_local, tmp_path, capsys):
    root = tmp_path / "in"
    write_tar(
        root / "a.tar",
        [(f"bad{i}", {"jpg": b"not an image"}) for i in range(3)]
        + [(f"ok{i}", {"jpg": encode(draw(i)[0])}) for i in range(3)],
    )
    out = tmp_path / "out"
    assert (
        cli.main(["--input", str(root), "--output", str(out), "--engine", "fake", "--max-error-rate", "0.2"])
        == 3
    )
    err = capsys.readouterr().err
    assert "50.0% of rows are errors" in err and "not_an_image" in err
    run = next(out.glob("run=*"))
    assert not (run / "_SUCCESS").exists() and len(list(run.glob("*.parquet"))) == 1
    summary = json.loads((run / "_summary.json").read_text())
    assert summary["status"].startswith("failed") and summary["errors_by_kind"]["not_an_image"]["count"] == 3
    assert summary["errors_by_kind"]["not_an_image"]["examples"][0].endswith("a.tar#bad0")
    # raising the budget seals the same run without recomputing it
    assert (
        cli.main(["--input", str(root), "--output", str(out), "--engine", "fake", "--max-error-rate", "0.6"])
        == 0
    )
    assert (run / "_SUCCESS").exists() and len(list(out.glob("run=*"))) == 1


def _job_id(p) -> str | None:
    """The Ray job id of a job subprocess attached to the test's cluster."""
    from ray._private.state import state

    return next((j["JobID"] for j in state.job_table() if j["DriverPid"] == p.pid), None)


def _wait_in_engine(p, rows_with=None, timeout=120) -> str:
    """Wait until the job has a batch inside the engine (its flight record), with `rows_with` in it."""
    from omnilmm_ray.faults import flight_records

    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        job = _job_id(p)
        recs = flight_records(job) if job else {}
        if any(rows_with is None or any(r.endswith(rows_with) for r in v["rows"]) for v in recs.values()):
            return job
        time.sleep(0.1)
    raise AssertionError(f"no batch reached the engine (rc={p.poll()}): {p.stderr.read().decode()[-2000:]}")


def _alive_actors(jobs: set[str]) -> list[dict]:
    """Actors of these jobs that Ray still counts alive, or whose process still runs."""
    from ray._private.state import state

    left = []
    for a in state.actor_table(None).values():
        if a["JobID"] in jobs and not a["IsDetached"]:
            pid = a.get("Pid") or 0
            running = pid > 0 and Path(f"/proc/{pid}").exists()
            if a["State"] != "DEAD" or running:
                left.append({k: a[k] for k in ("ActorClassName", "State", "Pid", "JobID")})
    return left


def test_job_kills_while_a_batch_is_in_the_engine_are_no_engine_crash(ray_local, tmp_path):
    """Two kills of the whole job with image 0 in the engine are not two engine deaths on image 0;
    and neither a finished nor a killed job leaves an actor or its process behind."""
    import ray

    build_samples(tmp_path / "in", shards=1, per_shard=8)
    inputs, out = tmp_path / "in" / "webdataset", tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--input", str(inputs), "--output", str(out)]
    cmd += ["--engine", "fake", "--batch-size", "8"]
    cluster = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    jobs = set()
    for rows_with in (None, ":0"):
        p = start([*cmd, "--fake-delay", "4"], cluster)  # the batch stays in the engine until the kill
        jobs.add(_wait_in_engine(p, rows_with))
        os.killpg(p.pid, signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    p = start(cmd, cluster)  # the same run (the engine's delay is no run setting), without waiting
    out_, err = p.communicate(timeout=300)
    err = err.decode()
    assert p.returncode == 0, err[-3000:]
    jobs.add(_job_id(p) or "")
    assert "killed an engine before" not in err
    t = pads.dataset(str(next(out.glob("run=*"))), format="parquet").to_table()
    assert sorted(t.column("sample_index").to_pylist()) == list(range(8))
    assert t.column("error_kind").null_count == 8, t.column("error_kind").to_pylist()

    deadline, left = time.time() + 60, None  # Ray reaps a dead driver's actors asynchronously
    while time.time() < deadline and (left := _alive_actors(jobs)):
        time.sleep(0.5)
    assert not left, left


def _pids_with_env(tag: str) -> set[int]:
    """Live processes whose environment holds `tag` (the job and every process its own Ray started)."""
    pids = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and tag.encode() in (d / "environ").read_bytes():
                pids.add(int(d.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return pids


@pytest.mark.integration
def test_a_killed_job_on_its_own_ray_leaves_no_process_behind(tmp_path):
    """SIGKILL of a job's process group while its own local Ray (RAY_ADDRESS=local) runs engine batches:
    that Ray's GCS, raylet, workers and Ray Data's helper actors all go with it."""
    build_samples(tmp_path / "in", shards=2, per_shard=8)
    cmd = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--input", str(tmp_path / "in" / "webdataset")]
    cmd += ["--output", str(tmp_path / "out"), "--engine", "fake", "--fake-delay", "3", "--batch-size", "4"]
    tag = f"{os.getpid()}-{time.time_ns()}"  # inherited by every process the job's own Ray starts
    log = tmp_path / "job.log"
    with open(log, "wb") as f:
        env = {**os.environ, "RAY_ADDRESS": "local", "OMNILMM_TEST_TAG": tag}
        p = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=f)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and "engine: " not in log.read_text():
        time.sleep(0.2)  # until the first captions came back: every stage of the pipeline is running
    mine = _pids_with_env(f"OMNILMM_TEST_TAG={tag}") - {p.pid}
    assert p.poll() is None and len(mine) >= 3, f"no Ray of its own running: {log.read_text()[-2000:]}"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    deadline = time.time() + 60
    while time.time() < deadline and (left := _pids_with_env(f"OMNILMM_TEST_TAG={tag}")):
        time.sleep(0.5)
    assert not left, subprocess.run(
        ["ps", "-o", "pid,stat,args", "-p", ",".join(map(str, left))], capture_output=True, text=True
    ).stdout
