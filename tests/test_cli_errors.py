"""Failures a user can fix: exit code as documented, one line that names the fix, no traceback.

The CLI runs in a subprocess: the behaviour depends on process state (environment, signals, starting Ray).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from omnilmm_ray.config import InputConfig
from omnilmm_ray.samples import build_samples
from omnilmm_ray.sources import plan_shards
from tests.conftest import ROOT

CAPTION, LATEST = str(ROOT / "jobs" / "caption.py"), str(ROOT / "jobs" / "latest.py")
# Fail fast against a closed port, and never look for credentials outside the environment.
FAST_AWS = {
    "AWS_MAX_ATTEMPTS": "1",
    "AWS_RETRY_MODE": "standard",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def cli(args, env=None, drop=(), script=CAPTION, timeout=120):
    e = {**os.environ, "PYTHONPATH": str(ROOT), **FAST_AWS, **(env or {})}
    for k in drop:
        e.pop(k, None)
    return subprocess.run(
        [sys.executable, script, *args], env=e, capture_output=True, text=True, timeout=timeout
    )


def one_line(r) -> str:
    """The whole stderr is one `error:` line."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def last_line(r) -> str:
    """After Ray started (its own log lines come first), the last line says what failed."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr.strip().splitlines()[-1]


def dry_run_to_s3(samples, **kw):
    args = ["--input", str(samples / "webdataset"), "--output", "s3://bucket/out", "--engine", "fake"]
    return cli([*args, "--dry-run"], **kw)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    build_samples(root, shards=2, per_shard=8)
    return root


def test_dry_run_with_unreachable_s3_output(samples):
    r = dry_run_to_s3(
        samples,
        env={"AWS_ENDPOINT_URL": closed_port_url(), "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
    )
    assert r.returncode == 2
    line = one_line(r)
    assert "output: s3://bucket/out" in line and "AWS_ENDPOINT_URL" in line


@pytest.mark.integration
def test_dry_run_with_uncredentialed_s3_output(samples, s3_endpoint):
    r = dry_run_to_s3(
        samples, drop=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    )
    assert r.returncode == 2
    assert "no credentials" in one_line(r)


@pytest.mark.integration
def test_dry_run_with_missing_bucket(samples, s3_endpoint):
    r = cli(["--input", str(samples / "webdataset"), "--output", "s3://no-such-bucket/out", "--dry-run"])
    assert r.returncode == 2
    assert "bucket does not exist" in one_line(r)


@pytest.mark.integration
def test_unreachable_input_endpoint(ray_local, tmp_path):
    import ray

    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"input": {"storage_options": {"endpoint_url": closed_port_url()}}}))
    args = ["--input", "s3://bucket/in/*.tar", "--output", str(tmp_path / "out"), "--engine", "fake"]
    r = cli([*args, "--config", str(cfg)], env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    assert r.returncode == 2
    line = last_line(r)
    assert (
        line.startswith("error: inputs: s3://bucket/in/*.tar: cannot reach")
        and "input.storage_options" in line
        and line.endswith(" [exit 2]")  # printed after Ray's shutdown, so it stays the last line
    )
    assert not list((tmp_path / "out").glob("run=*")), "nothing planned"
    r = cli([*args, "--config", str(cfg), "--dry-run"])
    assert r.returncode == 2 and one_line(r) == line


def test_latest_of_an_output_without_sealed_runs(tmp_path):
    dest = tmp_path / "latest.parquet"
    r = cli(["--output", str(tmp_path / "nonexistent"), "--to", str(dest)], script=LATEST)
    assert r.returncode == 2
    assert "no sealed run in" in one_line(r)
    assert not dest.exists()


@pytest.mark.integration
@pytest.mark.slow
def test_gpu_engine_without_gpu_on_own_ray_fails_at_once(samples, tmp_path):
    """The job starts its own Ray (RAY_ADDRESS=local), which can never gain a GPU: no waiting."""
    r = cli(
        ["--input", str(samples / "webdataset"), "--output", str(tmp_path / "out"), "--engine", "auto"],
        env={"RAY_ADDRESS": "local"},
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    line = last_line(r)
    assert line.startswith("error: engine.backend: 'auto' needs 1 GPU(s)") and "--engine fake" in line
    # Under `ray job submit` the job's log is stdout and stderr together: it must end with the reason.
    assert not r.stdout.strip()


@pytest.mark.integration
def test_locked_output_refused_before_starting_ray(samples, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = {"owner": "x", "host": "other-host", "pid": 1, "heartbeat": time.time()}
    (out / "_lock.json").write_text(json.dumps(lock))
    r = cli(
        ["--input", str(samples / "webdataset"), "--output", str(out), "--engine", "fake"],
        env={"RAY_ADDRESS": "local"},
    )
    assert r.returncode == 4
    assert "output is in use" in one_line(r)  # one line: Ray, which logs as it starts, was not started


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupt_releases_the_lease_and_says_how_to_resume(ray_local, samples, tmp_path, sig, code):
    import ray

    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "engine": {"backend": "fake", "fake_delay_s": 1.0},
                # one batch's images in the engine: the job is still captioning when the signal comes
                "scale": {"batch_size": 2, "concurrent_batches": 1},
                "sink": {"commit_rows": 2},
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    p = subprocess.Popen(
        [
            sys.executable,
            CAPTION,
            "--input",
            str(samples / "webdataset"),
            "--output",
            str(out),
            "--config",
            str(cfg),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not list(out.glob("run=*/*.part-*.parquet")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert (out / "_lock.json").exists(), "the job is captioning"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"interrupted; rerun the same command to resume [exit {code}]"
    assert not (out / "_lock.json").exists(), "lease released"


def test_glob_matching_folders_takes_the_files_inside(tmp_path):
    build_samples(tmp_path / "samples", shards=2, per_shard=3)
    shards = plan_shards([str(tmp_path / "samples" / "*")], InputConfig())
    assert {s.format for s in shards} == {"tar", "parquet", "files"}, shards
    files = [s for s in shards if s.format == "files"]
    assert all(k.startswith("files/") for s in files for k in s.members)
