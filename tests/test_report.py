"""`omnilmm-caption report --output URI [--json]`: the history of an output's runs from their summaries."""

import json

import pytest

from omnilmm_ray import cli
from omnilmm_ray.report import format_text, run_record
from omnilmm_ray.samples import build_samples, write_tar
from tests import hostile


def test_record_of_an_old_summary_and_of_a_run_without_one():
    old = {  # a summary written before attempts / gpu_seconds / finished_at were recorded
        "run": "20261101T010203000000Z",
        "rows": 10,
        "counts": {"ok": 9, "error": 1, "cached": 2},
        "errors_by_kind": {"decode_error": {"count": 1, "examples": ["a.tar#k"]}},
        "this_attempt": {"wall_s": 5.0, "rows_processed": 10},
    }
    rec = run_record(old["run"], {"shards": [{}, {}]}, old, sealed=True)
    assert rec["start"] == "2026-11-01T01:02:03+00:00" and rec["duration_s"] == 5.0
    assert (rec["images"], rec["ok"], rec["errors"], rec["cached"]) == (10, 9, 1, 2)
    assert rec["images_per_s"] == 2.0 and rec["gpu_seconds"] is None and rec["shards"] == 2
    stopped = run_record("20261102T000000000000Z", {"shards": [{}]}, None, sealed=False)
    assert stopped["images"] is None and "resumes" in stopped["status"]
    text = format_text([rec, stopped], "out")
    assert "decode_error: 1 (e.g. a.tar#k)" in text and "20261102T000000000000Z" in text


@pytest.mark.integration
def test_report_lists_runs_with_counts_and_error_examples(ray_local, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    build_samples(inp, shards=1, per_shard=6)
    args = ["--input", str(inp), "--output", str(out), "--engine", "fake", "--batch-size", "4"]
    assert cli.main(args) == 0
    write_tar(
        inp / "webdataset" / "hostile.tar", [(n, {"jpg": make()}) for n, (make, _) in hostile.CASES.items()]
    )
    assert cli.main(args) == 0  # a nightly run over the new tar only
    capsys.readouterr()

    assert cli.main(["report", "--output", str(out), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    summaries = [json.loads((out / f"run={r['run']}" / "_summary.json").read_text()) for r in runs]
    assert [r["run"] for r in runs] == sorted(r["run"] for r in runs) and len(runs) == 2
    for r, s in zip(runs, summaries):
        assert r["status"] == "sealed" and r["images"] == s["rows"] and r["ok"] == s["counts"]["ok"]
        assert r["errors"] == s["counts"]["error"] and r["cached"] == s["counts"]["cached"]
        assert r["flagged"] == s["quality"]["flagged_rows"] and r["flags"] == s["quality"]["by_flag"]
        assert r["images_per_s"] > 0 and r["gpu_seconds"] == 0.0  # the fake engine holds no GPU
        assert r["duration_s"] > 0 and r["start"] < s["finished_at"]
        assert r["summary"] == f"{out}/run={r['run']}/_summary.json"
    assert runs[0]["errors"] == 0 and runs[1]["images"] == len(hostile.CASES)
    assert runs[1]["error_kinds"] == {
        k: {"count": v["count"], "examples": v["examples"]} for k, v in summaries[1]["errors_by_kind"].items()
    }
    assert runs[1]["error_kinds"]["not_an_image"]["examples"][0].endswith("hostile.tar#not_image")

    assert cli.main(["report", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == [
        "run", "start", "duration", "images", "ok", "flagged", "errors", "cached", "images/s", "GPU-s", "status"
    ]  # fmt: skip
    assert runs[0]["run"] in text and runs[1]["run"] in text
    assert "not_an_image: 1 (e.g. " in text and "hostile.tar#not_image" in text


@pytest.mark.integration
def test_report_on_s3_and_unreachable_output(ray_local, s3, tmp_path, capsys):
    s3.mkdir("report-out")
    build_samples(tmp_path / "in", shards=1, per_shard=4)
    args = ["--input", str(tmp_path / "in" / "files"), "--output", "s3://report-out/t", "--engine", "fake"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(["report", "--output", "s3://report-out/t", "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert run["status"] == "sealed" and run["images"] == run["ok"] > 0
    assert cli.main(["report", "--output", "s3://no-such-bucket-here/t"]) == 2
    assert capsys.readouterr().err.startswith("error: output: no run in s3://no-such-bucket-here/t")
