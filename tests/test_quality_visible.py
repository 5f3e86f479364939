"""Quality flags show where people look: the progress line, the `done:` line, `omnilmm-caption report`, a
metric and the Grafana dashboard (a flagged row keeps its caption, so it counts as ok everywhere else)."""

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from omnilmm_ray import cli, schema
from omnilmm_ray.config import InputConfig
from omnilmm_ray.metrics import METRICS
from omnilmm_ray.progress import ProgressReporter
from omnilmm_ray.report import format_text, run_record
from omnilmm_ray.samples import build_samples
from omnilmm_ray.sources import plan_shards
from tests.conftest import ROOT

SUMMARY = {
    "run": "20261201T000000000000Z",
    "rows": 1024,
    "counts": {"ok": 864, "error": 160, "cached": 0, "flagged": 585},
    "quality": {
        "flagged_rows": 585,
        "by_flag": {"repetition": 300, "too_short": 200, "refusal": 90, "empty": 5},
        "retried": 0,
        "mended_by_retry": 0,
        "counted_as_errors": 0,
    },
    "errors_by_kind": {"empty_caption": {"count": 160, "examples": ["a.tar#1"]}},
    "this_attempt": {"images_per_s": 30.6, "wall_s": 33.5, "rows_processed": 1024},
}


def test_done_line_counts_flagged_rows():
    line = cli.done_line(SUMMARY, "s3://b/out")
    assert "1024 rows (864 ok, 585 of them flagged, 160 errors, 0 reused)" in line
    assert "top flags: repetition 300, too_short 200, refusal 90;" in line
    old = {k: v for k, v in SUMMARY.items() if k != "quality"}  # a summary from before quality flags
    assert "0 of them flagged" in cli.done_line(old, "out") and "top flags: none" in cli.done_line(old, "out")


def test_report_has_a_flagged_column_and_each_runs_flags():
    rec = run_record(SUMMARY["run"], {"shards": [{}]}, SUMMARY, sealed=True)
    assert rec["flagged"] == 585 and rec["flags"] == SUMMARY["quality"]["by_flag"]
    old_id = "20261101T000000000000Z"
    old = run_record(old_id, None, {k: v for k, v in SUMMARY.items() if k != "quality"}, sealed=True)
    assert old["flagged"] is None and old["flags"] == {}
    lines = format_text([rec, old], "out").splitlines()
    header = lines[0].split()
    assert header[header.index("ok") + 1] == "flagged"
    assert lines[1].split()[header.index("flagged")] == "585"
    assert "    flags: repetition 300, too_short 200, refusal 90, empty 5" in lines
    old_line = next(line for line in lines if line.startswith(old_id))
    assert old_line.split()[header.index("flagged")] == "-"  # not recorded, not 0


class RecordingMetrics:
    def __init__(self):
        self.flagged_rows, self.flags = 0, Counter()

    def planned(self, images, shards):
        pass

    def rows(self, status, error_kind, n):
        pass

    def committed(self, n):
        pass

    def flagged(self, rows, by_flag):
        self.flagged_rows += rows
        self.flags.update(by_flag)


def test_progress_line_and_metric_count_flagged_rows(tmp_path):
    build_samples(tmp_path, shards=1, per_shard=6)
    (shard,) = plan_shards([str(tmp_path / "parquet")], InputConfig())
    flags = [["too_short"], [], None, ["refusal", "too_short"], ["too_short"], []]
    rows = schema.table(
        [
            {"shard_id": shard.shard_id, "sample_index": i, "key": str(i), "flags": f}
            for i, f in enumerate(flags)
        ],
        schema.ENGINE_SCHEMA,
    )
    metrics = RecordingMetrics()
    rep = ProgressReporter([shard], {shard.shard_id: 6}, {}, 0, 1, every_s=30, metrics=metrics)
    rep.observe(rows, 0)
    assert rep.line().endswith("errors: none, flagged: 3 (too_short 3, refusal 1)")
    assert metrics.flagged_rows == 3 and metrics.flags == {"too_short": 3, "refusal": 1}


def test_flag_metrics_are_declared_and_on_the_dashboard():
    assert METRICS["omnilmm_images_flagged"][0] == "counter"
    assert METRICS["omnilmm_caption_flags"][2] == ("flag", "prompt")
    dash = json.loads((ROOT / "cluster" / "grafana-omnilmm.json").read_text())
    panels = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in dash["panels"]}
    quality = [t for t, e in panels.items() if "ray_omnilmm_images_flagged_total" in e]
    assert quality and "ray_omnilmm_images_total" in panels[quality[0]]  # a share of the captioned images
    assert any(re.search(r"sum by \(flag\).*ray_omnilmm_caption_flags_total", e) for e in panels.values())


@pytest.mark.integration
def test_fake_bad_captions_show_in_done_line_report_and_latest(ray_local, tmp_path, capsys):
    build_samples(tmp_path / "in", shards=2, per_shard=8)
    cfg = tmp_path / "job.yaml"
    cfg.write_text("engine: {backend: fake, fake_bad_captions: true}\nsink: {max_error_rate: 0.99}\n")
    out = tmp_path / "out"
    args = ["--config", str(cfg), "--input", str(tmp_path / "in" / "webdataset"), "--output", str(out)]
    assert cli.main(args) == 0
    done = capsys.readouterr().out.strip().splitlines()[-1]
    run = next(out.glob("run=*"))
    summary = json.loads((run / "_summary.json").read_text())
    q = summary["quality"]
    rows = pads.dataset(str(run), format="parquet").to_table().to_pylist()
    assert q["flagged_rows"] == sum(1 for r in rows if r["flags"]) > 0
    assert done.startswith("done: ") and "[exit" not in done
    assert f"({summary['counts']['ok']} ok, {q['flagged_rows']} of them flagged, " in done
    top, n = next(iter(q["by_flag"].items()))
    assert f"top flags: {top} {n}" in done

    assert cli.main(["report", "--output", str(out), "--json"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["flagged"] == q["flagged_rows"] and rec["flags"] == q["by_flag"]
    assert cli.main(["report", "--output", str(out)]) == 0
    assert "    flags: " + ", ".join(f"{k} {v}" for k, v in q["by_flag"].items()) in capsys.readouterr().out

    dest = tmp_path / "latest.parquet"  # the subcommand the container image runs
    assert cli.main(["latest", "--output", str(out), "--to", str(dest)]) == 0
    assert capsys.readouterr().out.strip() == f"{len(rows)} rows -> {dest}"
    assert pads.dataset(str(Path(dest))).count_rows() == len(rows)
