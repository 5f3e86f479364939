"""No credential reaches the output, the job's output streams, --dry-run / --print-config or an error message."""

import json
import os
import pickle
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from omnilmm_ray import schema
from omnilmm_ray.config import JobConfig, generation_fingerprint, load_config
from omnilmm_ray.redact import redact_text, redact_uri, register, uri_has_credentials
from omnilmm_ray.samples import build_samples, draw, encode, write_tar
from tests.conftest import ROOT

CAPTION = str(ROOT / "jobs" / "caption.py")


def test_storage_options_are_masked_when_dumped_but_real_where_used():
    opts = {"key": "AKIA-in", "secret": "SECRETKEY-unit-1234", "client_kwargs": {"region_name": "r"}}
    cfg = JobConfig(inputs=["s3://b/in"], output="s3://b/out", input={"storage_options": opts})
    dumped = json.dumps(cfg.model_dump(mode="json")) + repr(cfg) + str(cfg.model_dump())
    assert "SECRETKEY-unit-1234" not in dumped and "AKIA-in" not in dumped
    assert cfg.model_dump()["input"]["storage_options"] == {k: "***" for k in opts}  # keys stay visible
    assert cfg.input.storage_options == opts
    assert pickle.loads(pickle.dumps(cfg)).input.storage_options == opts  # what Ray ships to workers


def test_fingerprint_ignores_credentials():
    a = JobConfig(inputs=["a"], output="o", input={"storage_options": {"secret": "old"}})
    b = JobConfig(
        inputs=["a"],
        output="o",
        input={"storage_options": {"secret": "new"}},
        sink={"storage_options": {"token": "t"}},
    )
    assert generation_fingerprint(a) == generation_fingerprint(b)


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("s3://AKIA:SECRET-xyz@bucket/p/*.tar", "s3://***@bucket/p/*.tar"),
        (
            "https://h.example/a.tar?X-Amz-Credential=AK%2F1&X-Amz-Signature=deadbeef&X-Amz-Date=1",
            "https://h.example/a.tar?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1",
        ),
        (
            "https://acct.blob.core.windows.net/c/a.tar?sv=2022&sig=abc%2B",
            "https://acct.blob.core.windows.net/c/a.tar?sv=2022&sig=***",
        ),
    ],
)
def test_uris_with_credentials_are_redacted_and_refused(uri, shown):
    assert uri_has_credentials(uri) and redact_uri(uri) == shown
    assert redact_text(f"failed to read '{uri}': boom") == f"failed to read '{shown}': boom"
    assert not uri_has_credentials("s3://bucket/p/*.tar") and redact_uri("/local/a@b.tar") == "/local/a@b.tar"
    with pytest.raises(Exception) as e:
        load_config(None, {"input": [uri], "output": "o"})
    assert (
        "SECRET-xyz" not in str(e.value)
        and "deadbeef" not in str(e.value)
        and "input.storage_options" in str(e.value)
    )


def test_known_secret_values_are_masked_in_text_and_error_rows():
    register(["SECRETKEY-registered-42", "short"])
    assert redact_text("key=SECRETKEY-registered-42 short") == "key=*** short"
    row = schema.error(
        "shard_unreadable", "cannot open https://h/a.tar?sig=SIGSECRET-77 (SECRETKEY-registered-42)"
    )
    assert "SIGSECRET-77" not in row["error"] and "SECRETKEY-registered-42" not in row["error"]


# -- the whole job, in subprocesses, against a local S3 server --------------------------------------------

SECRETS = {
    "in_key": "AKIA-INPUT-KEYID-5678",
    "in_secret": "SECRETKEY-in-input-opts-1234",
    "out_key": "AKIA-SINK-KEYID-9012",
    "out_secret": "SECRETKEY-in-sink-opts-3456",
    "env_secret": "SECRETKEY-in-env-7890",
    "env_token": "SESSIONTOKEN-in-env-2468",
    "hf_token": "hf_SECRETTOKEN-in-env-1122",
    "uri_secret": "SECRETKEY-in-uri-1357",
}
ROTATED = {"in_secret": "SECRETKEY-rotated-input-8642", "out_secret": "SECRETKEY-rotated-sink-9753"}


def _config(path, in_secret, out_secret):
    path.write_text(
        yaml.safe_dump(
            {
                "engine": {"backend": "fake"},
                "scale": {"batch_size": 4},
                "input": {"storage_options": {"key": SECRETS["in_key"], "secret": in_secret}},
                "sink": {"storage_options": {"key": SECRETS["out_key"], "secret": out_secret}},
            }
        )
    )
    return str(path)


def _run(args, ray_address):
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "AWS_ACCESS_KEY_ID": "AKIA-ENV-KEYID-3344",
        "AWS_SECRET_ACCESS_KEY": SECRETS["env_secret"],
        "AWS_SESSION_TOKEN": SECRETS["env_token"],
        "HF_TOKEN": SECRETS["hf_token"],
        "AWS_MAX_ATTEMPTS": "1",
        "RAY_ADDRESS": ray_address,
    }
    return subprocess.run(
        [sys.executable, CAPTION, *args], env=env, capture_output=True, text=True, timeout=300
    )


def _leaks(text: str, secrets) -> list[str]:
    return [s for s in secrets if s in text]


@pytest.mark.integration
@pytest.mark.slow
def test_no_secret_in_output_streams_or_errors_and_key_rotation_is_accepted(s3, ray_local, tmp_path):
    import ray

    build_samples(tmp_path / "in", shards=2, per_shard=4)
    s3.mkdir("secrets-in")
    s3.mkdir("secrets-out")
    s3.put(str(tmp_path / "in" / "webdataset"), "secrets-in/wds", recursive=True)
    inputs, out = "s3://secrets-in/wds/*.tar", "s3://secrets-out/captions"
    cfg = _config(tmp_path / "job.yaml", SECRETS["in_secret"], SECRETS["out_secret"])
    secrets = list(SECRETS.values())
    streams = []

    def run(args, ray_address="local"):
        r = _run(args, ray_address)
        streams.append((args, r))
        return r

    assert run(["--print-config", "--config", cfg]).returncode == 0
    r = run(["--input", inputs, "--output", out, "--config", cfg, "--dry-run"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dry_run"]["shards"] == 2
    # a credentialed URI is refused, naming where credentials go instead
    uri_with_key = f"s3://AKIA-URI-KEYID:{SECRETS['uri_secret']}@secrets-in/wds/*.tar"
    r = run(["--input", uri_with_key, "--output", out, "--config", cfg])
    assert r.returncode == 2 and "input.storage_options" in r.stderr and "s3://***@secrets-in" in r.stderr
    # a failing run (no such output bucket) with secret storage options
    r = run(["--input", inputs, "--output", "s3://no-such-bucket/captions", "--config", cfg])
    assert r.returncode == 2 and "bucket does not exist" in r.stderr
    # the job itself, on its own Ray: workers inherit the secret environment and their logs reach the driver
    r = run(["--input", inputs, "--output", out, "--config", cfg])
    assert r.returncode == 0, r.stderr[-3000:]
    # rotated keys, one more shard: a new run of the same output, not "other settings"
    write_tar(tmp_path / "new.tar", [("n0", {"jpg": encode(draw(99)[0])})])
    s3.put(str(tmp_path / "new.tar"), "secrets-in/wds/new.tar")
    rotated = _config(tmp_path / "rotated.yaml", ROTATED["in_secret"], ROTATED["out_secret"])
    secrets += list(ROTATED.values())
    r = run(["--input", inputs, "--output", out, "--config", rotated], ray.get_runtime_context().gcs_address)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 rows" in r.stdout

    for args, r in streams:
        assert not _leaks(r.stdout + r.stderr, secrets), (args, _leaks(r.stdout + r.stderr, secrets))
    s3.invalidate_cache()
    objects = s3.find("secrets-out")
    assert sum(o.endswith("_SUCCESS") for o in objects) == 2
    for o in objects:
        data = s3.cat_file(o)
        assert not _leaks(data.decode("latin-1"), secrets), o
        if o.endswith(".parquet"):  # compressed: check the decoded values and metadata too
            with s3.open(o, "rb") as f:
                t = pq.read_table(f)
            assert not _leaks(str(t.to_pylist()) + str(t.schema.metadata), secrets), o
    summary = json.loads(s3.cat_file(next(o for o in objects if o.endswith("_summary.json"))))
    assert summary["config"]["input"]["storage_options"] == {"key": "***", "secret": "***"}
