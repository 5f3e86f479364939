"""The whole job on local Ray with the real engine in a GPU actor pool."""

import json

import pyarrow.dataset as pads
import pytest
import yaml

from omnilmm_ray import cli
from omnilmm_ray.samples import build_samples, draw, encode, write_tar

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    build_samples(root, shards=4, per_shard=64)
    good = encode(draw(7)[0])
    write_tar(
        root / "webdataset" / "99999.tar",
        [
            ("bad_bytes", {"jpg": b"definitely not a jpeg"}),
            ("truncated", {"jpg": good[: len(good) // 3]}),
            ("fine", {"jpg": good}),
        ],
    )
    return root / "webdataset"


def _config(tmp_path, tiny_model, backend):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "engine": {
                    "backend": backend,
                    "model": tiny_model,
                    "session_len": 2048,
                    "cache_max_entry_count": 0.2,
                },
                "generation": {"max_new_tokens": 16},
                "scale": {"batch_size": 16},
                "preprocess": {"max_side": 224},
            }
        )
    )
    return str(cfg)


def _run(tmp_path, tiny_model, backend, inputs):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "--config",
            _config(tmp_path, tiny_model, backend),
            "--output",
            str(out),
            *sum((["--input", str(i)] for i in inputs), []),
        ]
    )
    assert rc == 0
    run = sorted(out.glob("run=*"))[-1]
    assert (run / "_SUCCESS").exists()
    return pads.dataset(str(run), format="parquet").to_table(), json.loads(
        (run / "_summary.json").read_text()
    )


def test_job_turbomind_gpu_actor_pool(ray_gpu, tiny_model, shards, tmp_path):
    t, summary = _run(tmp_path, tiny_model, "turbomind", [shards])
    assert t.num_rows == 4 * 64 + 3
    rows = {r["key"]: r for r in t.to_pylist()}
    assert rows["bad_bytes"]["error_kind"] == "not_an_image" and rows["bad_bytes"]["caption"] is None
    assert rows["truncated"]["error_kind"] == "decode_error"
    others = [r for r in t.to_pylist() if r["key"] not in ("bad_bytes", "truncated")]
    print("error kinds of good images:", {r["key"]: r["error"] for r in others if r["error"]})
    # random weights may end the turn at once: an empty caption is an error row, anything else is a bug
    assert {r["error_kind"] for r in others} <= {None, "empty_caption"}
    ok = [r for r in others if r["error"] is None]
    assert len(ok) >= 0.9 * len(others)
    assert all(r["caption"] and r["output_tokens"] > 0 and r["model"] == tiny_model for r in ok)
    assert summary["this_attempt"]["backend"] == "turbomind"
    print("turbomind job:", summary["this_attempt"])


def test_job_pytorch_engine_once(ray_gpu, tiny_model, tmp_path):
    root = tmp_path / "in"
    build_samples(root, shards=1, per_shard=16)
    t, summary = _run(tmp_path, tiny_model, "pytorch", [root / "webdataset"])
    assert t.num_rows == 16 and t.column("error").null_count == 16
    assert summary["this_attempt"]["backend"] == "pytorch"
    print("pytorch job:", summary["this_attempt"])
