"""The whole job on a local Ray with the fake engine: local disk and a real S3 API server."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from omnilmm_ray import checks, cli
from omnilmm_ray.samples import build_samples, draw, encode, write_tar
from tests import hostile

pytestmark = pytest.mark.integration


def read_run(out) -> tuple[pa.Table, dict]:
    run = sorted(Path(out).glob("run=*"))[-1]
    assert (run / "_SUCCESS").exists()
    return pads.dataset(str(run), format="parquet").to_table(), json.loads(
        (run / "_summary.json").read_text()
    )


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    build_samples(root, shards=2, per_shard=8)
    samples = [
        (name, {"jpg" if name != "bomb" else "png": make()}) for name, (make, _) in hostile.CASES.items()
    ]
    samples.insert(3, ("no_image", {"json": b"{}", "txt": b"orphan sidecar"}))
    write_tar(root / "webdataset" / "hostile.tar", samples)
    pq.write_table(
        pa.table({"key": ["p0", "p1"], "image": [encode(draw(5)[0]), None]}),
        root / "parquet" / "nulls.parquet",
    )
    return root


def test_mixed_inputs_one_row_per_image_and_error_rows(ray_local, mixed_inputs, tmp_path):
    out = tmp_path / "out"
    rc = cli.main(
        [
            "--input",
            str(mixed_inputs / "webdataset"),
            "--input",
            str(mixed_inputs / "parquet"),
            "--input",
            str(mixed_inputs / "files"),
            "--output",
            str(out),
            "--engine",
            "fake",
            "--batch-size",
            "8",
        ]
    )
    assert rc == 0
    t, summary = read_run(out)
    n_images = 2 * 8 + len(hostile.CASES) + 8 + 2 + 4
    assert t.num_rows == n_images
    assert len({(r["source"], r["key"]) for r in t.to_pylist()}) == n_images
    rows = {r["key"]: r for r in t.to_pylist()}
    for name, (_, kind) in hostile.CASES.items():
        assert rows[name]["error_kind"] == kind, name
        assert (rows[name]["caption"] is None) == (kind is not None), name
    assert rows["exif_rotated"]["width"] == 40 and rows["exif_rotated"]["height"] == 80
    assert rows["p1"]["error_kind"] == "missing_image"
    assert "no_image" not in rows and summary["counts"]["skipped_without_image"] == 1
    assert summary["counts"]["error"] == sum(1 for _, k in hostile.CASES.values() if k) + 1
    assert summary["errors_by_kind"]["not_an_image"]["examples"][0].endswith("hostile.tar#not_image")
    assert json.loads(rows["000000000"]["metadata"])["key"] == "000000000" and rows["000000000"]["text"]
    assert summary["config"]["engine"]["backend"] == "fake" and summary["this_attempt"]["images_per_s"] > 0


def test_s3_input_and_output_via_aws_endpoint_url(ray_local, s3, tmp_path):
    local = tmp_path / "in"
    build_samples(local, shards=2, per_shard=6)
    s3.mkdir("captions-in")
    s3.mkdir("captions-out")
    s3.put(str(local) + "/", "captions-in/data/", recursive=True)
    rc = cli.main(
        [
            "--input",
            "s3://captions-in/data/webdataset/*.tar",
            "--input",
            "s3://captions-in/data/files",
            "--input",
            "s3://captions-in/data/parquet",
            "--output",
            "s3://captions-out/table",
            "--engine",
            "fake",
        ]
    )
    assert rc == 0
    runs = [p for p in s3.ls("captions-out/table") if p.rsplit("/", 1)[-1].startswith("run=")]
    assert len(runs) == 1 and s3.exists(f"{runs[0]}/_SUCCESS")
    t = pads.dataset(runs[0], filesystem=s3, format="parquet").to_table()
    assert t.num_rows == 2 * 6 + 6 + 3 and t.column("error").null_count == t.num_rows
    assert set(t.column("source").to_pylist()) >= {"s3://captions-in/data/webdataset/00000.tar"}
    summary = json.loads(s3.cat_file(f"{runs[0]}/_summary.json"))
    assert summary["rows"] == t.num_rows


def test_bad_config_input_and_output_fail_before_work(ray_local, mixed_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--input", str(mixed_inputs), "--output", str(out), "--batch-size", "0"]) == 2
    assert "scale.batch_size" in capsys.readouterr().err
    assert (
        cli.main(["--input", str(tmp_path / "nothing-*.tar"), "--output", str(out), "--engine", "fake"]) == 2
    )
    assert "matches no file" in capsys.readouterr().err
    assert (
        cli.main(["--input", str(mixed_inputs), "--output", "s3://no-such-bucket-here/x", "--engine", "fake"])
        == 2
    )
    assert "output: s3://no-such-bucket-here/x: the bucket does not exist" in capsys.readouterr().err
    assert not list(out.glob("*"))


def test_dry_run_lists_and_runs_nothing(mixed_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        cli.main(["--input", str(mixed_inputs), "--output", str(out), "--engine", "fake", "--dry-run"]) == 0
    )
    plan = json.loads(capsys.readouterr().out)["dry_run"]
    assert plan["by_format"] == {"tar": 3, "parquet": 2, "files": 1} and plan["mode"] == "new run"
    assert plan["actors"]["num_gpus"] == 0
    assert not out.exists()


def test_second_job_on_a_locked_output_refuses(ray_local, mixed_inputs, tmp_path, capsys):
    from omnilmm_ray.lease import Lease

    out = tmp_path / "out"
    out.mkdir()
    with Lease(str(out), ttl_s=60):
        rc = cli.main(["--input", str(mixed_inputs / "files"), "--output", str(out), "--engine", "fake"])
    assert rc == 4 and "output is in use" in capsys.readouterr().err
    assert cli.main(["--input", str(mixed_inputs / "files"), "--output", str(out), "--engine", "fake"]) == 0


def test_decoding_stays_out_of_the_engine_actor(ray_local, mixed_inputs, tmp_path):
    from omnilmm_ray.config import JobConfig
    from omnilmm_ray.pipeline import build_dataset
    from omnilmm_ray.sources import plan_shards

    cfg = JobConfig(inputs=[str(mixed_inputs / "files")], output=str(tmp_path), engine={"backend": "fake"})
    ds = build_dataset(plan_shards(cfg.inputs, cfg.input), cfg, str(tmp_path), None).materialize()
    stats = ds.stats()
    assert "MapBatches(preprocess_stage)" in stats and "->MapBatches(CaptionStage)" not in stats


def test_real_engine_without_gpus_fails_with_a_clear_message(
    ray_local, mixed_inputs, tmp_path, capsys, monkeypatch
):
    # As on a cluster that may gain GPU workers: wait engine.start_timeout_s (a Ray the job started
    # itself fails at once: tests/test_cli_errors.py).
    monkeypatch.setattr(checks, "attached_to_cluster", lambda: True)
    cfg = tmp_path / "job.yaml"
    cfg.write_text("engine: {backend: turbomind, start_timeout_s: 2}\n")
    out = tmp_path / "out"
    rc = cli.main(["--config", str(cfg), "--input", str(mixed_inputs / "files"), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err[-3000:]
    assert "engine.tp: no engine actor started within 2s" in err, err[-2000:]
    assert not list(out.glob("run=*"))
