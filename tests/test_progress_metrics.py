"""The driver's progress line and the Prometheus metrics on Ray's metrics endpoint (fake engine)."""

import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import pyarrow as pa
import pytest

from omnilmm_ray import cli, schema
from omnilmm_ray.config import InputConfig
from omnilmm_ray.metrics import METRICS
from omnilmm_ray.progress import ProgressReporter, plan_counts
from omnilmm_ray.samples import build_samples, write_tar
from omnilmm_ray.sources import Retry, plan_shards
from tests import hostile
from tests.conftest import ROOT


def _rows(shard_id: str, indices: list[int], kinds: dict[int, str] | None = None) -> pa.Table:
    kinds = kinds or {}
    return schema.table(
        [
            {
                "shard_id": shard_id,
                "sample_index": i,
                "key": str(i),
                "error_kind": kinds.get(i),
                "cached": False,
            }
            for i in indices
        ],
        schema.ENGINE_SCHEMA,
    )


def _end(shard_id: str, rows: int) -> pa.Table:
    return schema.table([{"shard_id": shard_id, "shard_rows": rows}], schema.ENGINE_SCHEMA)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_planned_counts_exact_where_cheap_estimated_for_tars_then_exact(tmp_path):
    build_samples(tmp_path, shards=2, per_shard=8)  # 2 tars of 8, a Parquet file of 8, 4 loose files
    shards = plan_shards([str(tmp_path)], InputConfig())
    by_fmt = {s.format: s for s in shards}
    counts = plan_counts(shards)
    assert counts[by_fmt["parquet"].shard_id] == 8  # from the footer
    assert counts[by_fmt["files"].shard_id] == len(by_fmt["files"].members)
    tars = [s for s in shards if s.format == "tar"]
    assert [counts[s.shard_id] for s in tars] == [None, None]  # member counts are not cheap

    clock = Clock()
    rep = ProgressReporter(shards, counts, {}, 0, len(shards), every_s=30, clock=clock)
    planned, estimated = rep.planned()
    assert estimated and planned > 8 + len(by_fmt["files"].members)
    assert "~" in rep.line() and "shards 0/4 committed" in rep.line()

    for s in tars:  # every tar's end marker arrives: the count is exact
        rep.observe(
            pa.concat_tables([_rows(s.shard_id, list(range(8)), {3: "decode_error"}), _end(s.shard_id, 8)]), 0
        )
    clock.t += 10
    rep.observe(_rows(by_fmt["parquet"].shard_id, list(range(4))), 2)
    assert rep.planned() == (8 + 8 + 8 + len(by_fmt["files"].members), False)
    line = rep.line()
    assert line.startswith(f"progress: 20/{24 + len(by_fmt['files'].members)} images")
    assert "shards 2/4 committed" in line and "errors: decode_error 2" in line
    assert "1.2 images/s (last 10s)" in line  # 12 images in the 10 s since the first batch came back
    assert "ETA " in line and "~" not in line


def test_resumed_and_retried_shards_count_only_what_is_left(tmp_path):
    build_samples(tmp_path, shards=1, per_shard=10)
    shards = plan_shards([str(tmp_path / "parquet")], InputConfig())
    whole = shards[0]
    retried = replace(whole, shard_id="r", retry=Retry(frozenset({1, 2}), 7))
    counts = plan_counts([whole, retried])
    assert counts == {whole.shard_id: 10, "r": 2 + 3}  # indices 1, 2 and 7..9
    rep = ProgressReporter([whole, retried], counts, {whole.shard_id: {0, 1, 2, 3}}, 5, 7, every_s=30)
    assert rep.planned() == (6 + 5, False)  # 4 of the whole shard's rows are in part files already
    assert "shards 5/7 committed" in rep.line()


def _parquet_shard(tmp_path, images: int):
    build_samples(tmp_path, shards=1, per_shard=images)
    (shard,) = plan_shards([str(tmp_path / "parquet")], InputConfig())
    return shard


def test_eta_uses_the_recent_rate_not_the_average_since_start_up(tmp_path):
    shard = _parquet_shard(tmp_path, 10)
    clock = Clock()
    rep = ProgressReporter([shard], {shard.shard_id: 10_000}, {}, 0, 1, every_s=30, clock=clock)
    clock.t += 40  # the engine's start-up: nothing comes back
    assert rep.line().endswith("? images/s, ETA ?, errors: none, flagged: none")
    rep.observe(_rows(shard.shard_id, list(range(50))), 0)  # the first batch
    for i in range(5):  # then 10 images/s
        clock.t += 1
        if i == 0:  # one batch is no rate yet (not 0 images/s)
            assert "? images/s, ETA ?" in rep.line()
        rep.observe(_rows(shard.shard_id, list(range(50 + 10 * i, 60 + 10 * i))), 0)
    line = rep.line()
    assert line.startswith("progress: 100/10,000 images (1%)")
    # 9,900 left at 10/s; the average since the start (100 in 45 s) would say 1h14m
    assert "10.0 images/s (last 5s)" in line and "ETA 16m30s" in line, line

    for i in range(120):  # two more actors: 30 images/s; the window forgets the slower minute
        clock.t += 1
        rep.observe(_rows(shard.shard_id, list(range(100 + 30 * i, 130 + 30 * i))), 0)
    line = rep.line()
    assert "30.0 images/s (last 60s)" in line and "ETA 3m30s" in line, line  # 6,300 left
    clock.t += 90  # a stall
    assert "0.0 images/s (last 90s), ETA ?" in rep.line()


def test_first_line_at_start_shows_the_planned_shards_before_any_image_count(caplog, tmp_path):
    build_samples(tmp_path, shards=3, per_shard=4)
    shards = plan_shards([str(tmp_path / "webdataset")], InputConfig())
    assert [s.format for s in shards] == ["tar"] * 3  # member counts are known only once read
    clock = Clock()
    rep = ProgressReporter(shards, plan_counts(shards), {}, 0, 3, every_s=3600, clock=clock)
    assert rep.planned() == (None, True)
    with caplog.at_level(logging.INFO, logger="omnilmm_ray"):
        rep.start()
        first = [r.message for r in caplog.records if r.message.startswith("progress:")]
        rep.stop()
    assert first == [
        "progress: 0/? images, shards 0/3 committed, ? images/s, ETA ?, errors: none, flagged: none"
    ]
    rep.observe(pa.concat_tables([_rows(shards[0].shard_id, list(range(4))), _end(shards[0].shard_id, 4)]), 1)
    # one tar read: the others are estimated from its bytes per image
    assert re.match(r"progress: 4/~\d+ images \(\d+%\), shards 1/3 committed", rep.line()), rep.line()


def test_progress_thread_logs_every_interval(caplog, tmp_path):
    build_samples(tmp_path, shards=1, per_shard=4)
    shards = plan_shards([str(tmp_path / "files")], InputConfig())
    rep = ProgressReporter(shards, plan_counts(shards), {}, 0, 1, every_s=0.05)
    with caplog.at_level(logging.INFO, logger="omnilmm_ray"):
        rep.start()
        deadline = time.monotonic() + 30
        while sum("progress:" in r.message for r in caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        rep.stop()
    lines = [r.message for r in caplog.records if r.message.startswith("progress:")]
    assert len(lines) >= 3  # two while running, one at the end
    assert lines[-1].startswith(f"progress: 0/{len(shards[0].members)} images")


def _metrics_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _series(text: str, name: str) -> list[tuple[str, float]]:
    return [
        (m.group(1) or "", float(m.group(2)))
        for m in re.finditer(rf"^{name}(?:{{(.*)}})? ([0-9.e+-]+)$", text, re.M)
    ]


def _exported(kind: str, name: str) -> str:
    return {"counter": f"ray_{name}_total", "gauge": f"ray_{name}", "histogram": f"ray_{name}_count"}[kind]


@pytest.mark.integration
def test_fake_run_logs_progress_and_exports_metrics(ray_local, tmp_path, caplog, capsys):
    import ray

    build_samples(tmp_path / "in", shards=3, per_shard=8)
    write_tar(
        tmp_path / "in" / "webdataset" / "hostile.tar",
        [(n, {"jpg": make()}) for n, (make, _) in hostile.CASES.items()],
    )
    job = tmp_path / "job.yaml"
    # bad captions: the quality flags are exported too
    job.write_text("report: {progress_s: 0.2}\nengine: {fake_delay_s: 0.2, fake_bad_captions: true}\n")
    with caplog.at_level(logging.INFO, logger="omnilmm_ray"):
        rc = cli.main(
            ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--engine", "fake"]
            + ["--batch-size", "4", "--config", str(job)]
        )
    assert rc == 0
    run = next((tmp_path / "out").glob("run=*"))
    summary = json.loads((run / "_summary.json").read_text())
    n, shards = summary["rows"], summary["shards"]
    lines = [r.message for r in caplog.records if r.message.startswith("progress:")]
    assert len(lines) >= 2, lines
    assert lines[-1].startswith(f"progress: {n}/{n} images (100%), shards {shards}/{shards} committed")
    bad = sorted((k, v["count"]) for k, v in summary["errors_by_kind"].items())
    assert bad and all(f"{k} {c}" in lines[-1] for k, c in bad)
    flagged = summary["quality"]["flagged_rows"]
    assert flagged and f"flagged: {flagged:,} (" in lines[-1]
    # the driver's memory and the object store of the Ray it ran on, as `ray memory --stats-only` reads them
    store = ray.cluster_resources()["object_store_memory"] / 1e9
    mem = re.search(
        r", memory: driver (\d+) MB \((\d+) MB private\), object store ([\d.]+)/([\d.]+) GB, spilled \d+ [KMG]?B$",
        lines[-1],
    )
    assert mem, lines[-1]
    assert 50 < int(mem[2]) < int(mem[1]) < 8000, lines[-1]  # the private part is part of the resident memory
    assert float(mem[3]) <= float(mem[4]) and abs(float(mem[4]) - store) < 0.1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("omnilmm_ray")]
    done = capsys.readouterr().out.strip().splitlines()[-1]
    assert done.startswith("done: ") and f"summary: {run}/_summary.json" in done
    top = max(summary["errors_by_kind"].items(), key=lambda kv: kv[1]["count"])
    assert f"{top[0]} {top[1]['count']}" in done

    # Ray's metrics agent exports what the driver and the engine actors recorded on the node's metrics port.
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = {_exported(kind, name) for name, (kind, _, _) in METRICS.items()}
    # Each is looked for in any scrape: the agent drops a gauge nobody reports any more (~20 s after the run).
    # Counters reach the endpoint as the agent exports them: scrape until every one shows this run's totals.
    totals = {
        "ray_omnilmm_images_total": n,
        "ray_omnilmm_shards_committed_total": shards,
        "ray_omnilmm_images_flagged_total": summary["quality"]["flagged_rows"],
    }

    def complete() -> bool:
        return set(seen) == wanted and all(
            sum(v for _, v in _series(seen[k], k)) >= t for k, t in totals.items()
        )

    deadline, seen = time.monotonic() + 120, {}
    while time.monotonic() < deadline and not complete():
        text = _metrics_text(port)
        seen.update({w: text for w in wanted if _series(text, w)})
        time.sleep(0.5)
    missing = sorted(wanted - set(seen))
    assert not missing, f"not on the metrics endpoint: {missing}"

    def series(name):
        return _series(seen[name], name)

    images = series("ray_omnilmm_images_total")
    assert sum(v for _, v in images) >= n  # counters add up over the session's runs
    assert any('status="failed"' in tags and 'error_kind="not_an_image"' in tags for tags, _ in images)
    assert sum(v for _, v in series("ray_omnilmm_shards_committed_total")) >= shards
    assert any('kind="output"' in tags for tags, _ in series("ray_omnilmm_tokens_total"))
    assert sum(v for _, v in series("ray_omnilmm_images_flagged_total")) >= flagged
    by_flag = {
        re.search(r'flag="([a-z_]+)"', t).group(1) for t, _ in series("ray_omnilmm_caption_flags_total")
    }
    assert set(summary["quality"]["by_flag"]) <= by_flag


def test_grafana_dashboard_queries_only_emitted_metrics():
    dash = json.loads((ROOT / "cluster" / "grafana-omnilmm.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    emitted = set()
    for name, (kind, _, _) in METRICS.items():
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[kind]
        emitted |= {f"ray_{name}{s}" for s in suffixes}
    queried = {m for e in exprs for m in re.findall(r"\bray_omnilmm_[a-z_]+", e)}
    assert queried and queried <= emitted, sorted(queried - emitted)
    assert {f"ray_{n}" for n in METRICS} <= {re.sub(r"_(total|bucket|sum|count)$", "", q) for q in queried}


def test_memory_part_of_the_line():
    from omnilmm_ray.memory import memory_text

    gb = 10**9
    store = {"store_used": 1.2 * gb, "store_capacity": 18 * gb, "spilled": 0}
    assert (
        memory_text({"driver_rss": 612 * 10**6, "driver_private": 431 * 10**6, **store})
        == "driver 612 MB (431 MB private), object store 1.2/18.0 GB, spilled 0 B"
    )
    assert (
        memory_text({"driver_rss": 612 * 10**6, **store})
        == "driver 612 MB, object store 1.2/18.0 GB, spilled 0 B"
    )
    assert memory_text({"driver_rss": 2 * gb, "store_used": 0, "store_capacity": gb, "spilled": 3 * gb}) == (
        "driver 2.0 GB, object store 0.0/1.0 GB, spilled 3.0 GB"
    )
    assert memory_text({"driver_rss": 5 * 10**5}) == "driver 500 KB"  # the store could not be read
    assert memory_text({"driver_rss": None}) == "?"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_driver_memory_counts_what_the_driver_allocates_as_private():
    from omnilmm_ray.memory import driver_memory

    before = driver_memory()
    held = b"\x01" * (200 * 2**20)  # every page written, so resident (a zeroed one might not be)
    after = driver_memory()
    assert before["driver_private"] < before["driver_rss"]  # the interpreter's mapped files are not private
    assert 190 * 2**20 < after["driver_private"] - before["driver_private"] < 260 * 2**20
    assert 190 * 2**20 < after["driver_rss"] - before["driver_rss"] < 260 * 2**20
    del held


@pytest.mark.integration
@pytest.mark.slow
def test_memory_sampling_survives_a_second_ray_cluster_in_the_same_process(tmp_path):
    """A process that runs jobs on two Ray clusters one after the other (tests, notebooks, the Python API):
    the progress line's object-store reading must follow the current cluster. A GCS client kept from the first
    one made Ray end the whole process with status 1 once its GCS was gone ("Failed to connect to GCS within 60
    seconds ... The program will terminate")."""
    script = tmp_path / "two_clusters.py"
    script.write_text(
        "import ray\n"
        "from omnilmm_ray.memory import cluster_memory\n"
        "for store in (80_000_000, 120_000_000):\n"
        "    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=store)\n"
        "    print(cluster_memory()['store_capacity'], flush=True)\n"
        "    ray.shutdown()\n"
        "print(cluster_memory(), flush=True)\n"  # no cluster: the driver alone
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    first, second, last = r.stdout.strip().splitlines()[-3:]
    assert abs(int(first) - 80_000_000) < 5_000_000 and abs(int(second) - 120_000_000) < 5_000_000, r.stdout
    assert "store_capacity" not in last and "driver_rss" in last
