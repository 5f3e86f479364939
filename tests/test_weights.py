"""Model weights from object storage (weights.py) on the local S3 server: one download per node, shared by
concurrent engine starts, never a half-written cache, and the job's fake-engine path through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from omnilmm_ray import cli
from omnilmm_ray.samples import build_samples
from omnilmm_ray.weights import download_once, is_remote, local_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
# A stand-in for the tiny Qwen2-VL of omnilmm_ray/testing/tiny_vlm.py (which needs torch): the files the
# driver and the engine read first, a weights file big enough to take several reads, and a subfolder.
CONFIG = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl"}
PROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 200704,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


def _upload(s3, uri: str, weights: bytes = b"\x01" * 3_000_000) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps(CONFIG).encode(),
        "preprocessor_config.json": json.dumps(PROCESSOR).encode(),
        "model.safetensors": weights,
        "tokenizer/tokenizer.json": b"{}",
    }
    for rel, data in files.items():
        s3.pipe_file(f"{uri.removeprefix('s3://').rstrip('/')}/{rel}", data)
    s3.invalidate_cache()
    return files


@pytest.fixture
def model_uri(s3, request):
    bucket = "models-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    s3.mkdir(bucket)
    uri = f"s3://{bucket}/Tiny-Qwen2-VL/"
    files = _upload(s3, uri)
    return uri, files


def _same_files(path: Path, files: dict[str, bytes]) -> None:
    got = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert got == files


def _spawn(uri: str, root: Path, **env) -> subprocess.Popen:
    code = (
        "import json, sys; from pathlib import Path; from omnilmm_ray.weights import download_once; "
        "p, fetched = download_once(sys.argv[1], Path(sys.argv[2])); print(json.dumps([str(p), fetched]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, uri, str(root)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        start_new_session=True,  # a kill drill takes down this process group only
    )


def test_uris_are_remote_paths_and_hub_ids_are_not(tmp_path):
    assert is_remote("s3://bucket/models/X/") and is_remote("gs://b/m") and is_remote("az://c/m")
    assert not is_remote("Qwen/Qwen2-VL-2B-Instruct") and not is_remote("/mnt/models/X")
    assert not is_remote("file:///mnt/models/X")
    # a hub id or a shared volume is handed to the engine unchanged, nothing is written
    assert local_model("Qwen/Qwen2-VL-2B-Instruct", str(tmp_path)) == "Qwen/Qwen2-VL-2B-Instruct"
    assert local_model("/mnt/models/X", str(tmp_path)) == "/mnt/models/X"
    assert list(tmp_path.iterdir()) == []


def test_concurrent_starts_on_one_node_share_one_download(model_uri, tmp_path):
    uri, files = model_uri
    procs = [_spawn(uri, tmp_path) for _ in range(3)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({path for path, _ in results}) == 1
    assert sorted(fetched for _, fetched in results) == [False, False, True]
    _same_files(Path(results[0][0]), files)
    assert not list(tmp_path.glob(".tmp-*"))
    # a later engine start on this node finds it without downloading
    assert download_once(uri, tmp_path) == (Path(results[0][0]), False)


def test_a_download_killed_midway_is_never_used_and_is_redone(model_uri, tmp_path):
    uri, files = model_uri
    proc = _spawn(uri, tmp_path, OMNILMM_KILL_AT="model_download")  # SIGKILL after the first file
    proc.communicate(timeout=120)
    assert proc.returncode == -9
    entries = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and entries[0].startswith(".tmp-"), entries  # only the temporary folder
    path, fetched = download_once(uri, tmp_path)
    assert fetched
    _same_files(path, files)
    assert not list(tmp_path.glob(".tmp-*"))  # the dead download's leftovers are gone


def test_new_weights_under_the_same_uri_are_a_new_cache_entry(model_uri, s3, tmp_path):
    uri, files = model_uri
    first, _ = download_once(uri, tmp_path)
    files = _upload(s3, uri, weights=b"\x02" * 3_000_001)
    second, fetched = download_once(uri, tmp_path)
    assert fetched and second != first
    _same_files(second, files)


def test_a_folder_without_a_model_is_a_clear_error(s3, tmp_path):
    s3.mkdir("models-empty")
    s3.pipe_file("models-empty/NotAModel/readme.txt", b"hi")
    with pytest.raises(ValueError, match=r"engine.model: s3://models-empty/NotAModel/ holds no config.json"):
        local_model("s3://models-empty/NotAModel/", str(tmp_path))
    with pytest.raises(ValueError, match=r"engine.model: .*no config.json"):
        local_model("s3://models-empty/Missing/", str(tmp_path))


def test_job_reads_the_model_from_object_storage(model_uri, ray_local, tmp_path):
    """The driver reads the processor config from S3 (the CPU workers then make patches) and the engine
    actor opens its node's cached copy."""
    uri, files = model_uri
    build_samples(tmp_path / "in", shards=2, per_shard=4)
    cache = tmp_path / "cache"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"engine: {{cache_dir: {cache}}}\n")
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in" / "webdataset"), "--output", str(out), "--config", str(cfg)]
    assert cli.main([*args, "--engine", "fake", "--model", uri]) == 0
    t = pads.dataset(str(next(out.glob("run=*"))), format="parquet").to_table().to_pylist()
    assert len(t) == 8 and all("given as patches" in r["caption"] for r in t)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    _same_files(entry, files)
