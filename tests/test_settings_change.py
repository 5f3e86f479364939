"""Settings change on an existing output: an ordinary night, not a new output. A template typo stops before
anything is sealed; duplicates inside one night reach the engine once."""

import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from omnilmm_ray import cli
from omnilmm_ray.report import history
from omnilmm_ray.samples import draw, encode, write_tar
from omnilmm_ray.table import ABANDONED, OutputTable

pytestmark = pytest.mark.integration


def _job(tmp_path, inputs, calls, **cfg) -> int:
    cfg = {"engine": {"backend": "fake", "fake_calls_log": str(calls)}, **cfg}
    f = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return cli.main(["--config", str(f), "--input", str(inputs), "--output", str(tmp_path / "out")])


def _engine_images(calls: Path) -> int:
    """Images the fake engine was asked to caption since the log was last emptied."""
    n = sum(int(x) for x in calls.read_text().split()) if calls.exists() else 0
    calls.write_text("")
    return n


def _latest(tmp_path) -> list[dict]:
    return OutputTable(str(tmp_path / "out")).read_latest().to_pylist()


def _tar(path, images: list[tuple[str, int, dict | None]]) -> Path:
    samples = []
    for key, seed, meta in images:
        parts = {"jpg": encode(draw(seed)[0])}
        if meta is not None:
            parts["json"] = json.dumps(meta).encode()
        samples.append((key, parts))
    return write_tar(path, samples)


def test_a_new_prompt_is_an_ordinary_night_and_reuse_serves_any_earlier_settings(ray_local, tmp_path):
    inputs, calls = tmp_path / "in", tmp_path / "calls.log"
    _tar(inputs / "a.tar", [(f"k{i}", i, None) for i in range(4)])
    assert _job(tmp_path, inputs, calls, prompt="Describe it.") == 0
    assert _engine_images(calls) == 4

    assert _job(tmp_path, inputs, calls, prompt="Say what you see.") == 0  # was refused with exit 2
    assert _engine_images(calls) == 4  # every image again: its newest caption had other settings
    rows = _latest(tmp_path)
    assert len(rows) == 4 and {r["prompt"] for r in rows} == {"Say what you see."}

    assert _job(tmp_path, inputs, calls, prompt="Describe it.") == 0  # back: the first night serves it
    assert _engine_images(calls) == 0
    rows = _latest(tmp_path)
    assert {r["prompt"] for r in rows} == {"Describe it."} and all(r["cached"] for r in rows)

    assert _job(tmp_path, inputs, calls, prompt="Describe it.") == 0  # same settings: nothing new
    table = OutputTable(str(tmp_path / "out"))
    assert table.plan_of(table.sealed_runs()[-1])["shards"] == [] and _engine_images(calls) == 0


def test_a_template_field_no_sample_has_is_a_typo(ray_local, tmp_path, capsys):
    inputs, calls = tmp_path / "in", tmp_path / "calls.log"
    _tar(inputs / "a.tar", [(f"k{i}", i, {"title": f"t{i}"}) for i in range(3)])
    assert _job(tmp_path, inputs, calls, prompt="Title: {metadata.tittle}. Describe it.") == 2
    err = capsys.readouterr().err
    assert "typo" in err and "metadata.tittle" in err and "nothing was sealed" in err
    table = OutputTable(str(tmp_path / "out"))
    (typo_run,) = table.run_ids()
    assert table.sealed_runs() == []

    assert _job(tmp_path, inputs, calls, prompt="Title: {metadata.title}. Describe it.") == 0
    rows = _latest(tmp_path)
    assert [r["prompt"] for r in rows] == [f"Title: t{i}. Describe it." for i in range(3)]
    assert all(r["error"] is None for r in rows)
    assert table.abandoned(typo_run)["by"] == table.sealed_runs()[-1]
    assert (tmp_path / "out" / f"run={typo_run}" / ABANDONED).exists()
    (record,) = [r for r in history(str(tmp_path / "out")) if r["run"] == typo_run]
    assert record["status"].startswith("abandoned: settings changed")


def test_a_field_some_samples_lack_stays_an_error_row_until_the_settings_change(ray_local, tmp_path):
    inputs, calls = tmp_path / "in", tmp_path / "calls.log"
    _tar(inputs / "a.tar", [("k0", 0, {"title": "t0"}), ("k1", 1, {}), ("k2", 2, None)])
    assert _job(tmp_path, inputs, calls, prompt="Title: {metadata.title}.") == 0
    kinds = [r["error_kind"] for r in _latest(tmp_path)]
    assert kinds == [None, "missing_prompt_field", "missing_prompt_field"]

    assert _job(tmp_path, inputs, calls, prompt="Describe it.") == 0
    rows = _latest(tmp_path)
    assert [r["error_kind"] for r in rows] == [None] * 3 and all(r["caption"] for r in rows)


def test_duplicates_within_a_night_reach_the_engine_once(ray_local, tmp_path):
    inputs, calls = tmp_path / "in", tmp_path / "calls.log"
    _tar(inputs / "a.tar", [("a0", 7, None), ("a1", 7, None), ("a2", 8, None), ("a3", 7, None)])
    _tar(inputs / "b.tar", [("b0", 8, None), ("b1", 9, None)])
    assert _job(tmp_path, inputs, calls, scale={"batch_size": 2}) == 0
    assert _engine_images(calls) == 3  # three distinct images
    run = sorted((tmp_path / "out").glob("run=*"))[-1]
    rows = pads.dataset(str(run), format="parquet").to_table().to_pylist()
    assert len(rows) == 6 and all(r["caption"] for r in rows)
    assert sum(r["cached"] for r in rows) == 3
    captions = {r["sha256"]: r["caption"] for r in rows}
    assert all(r["caption"] == captions[r["sha256"]] for r in rows)
    summary = json.loads((run / "_summary.json").read_text())
    assert summary["counts"]["cached"] == 3
