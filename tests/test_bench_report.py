"""bench/gpu_scale.py's reading of the job's log: the engine actors' own rate, beside the steady window."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_scale", ROOT / "bench" / "gpu_scale.py")
gpu_scale = importlib.util.module_from_spec(spec)
sys.modules["gpu_scale"] = gpu_scale  # make_shards's worker processes find its functions by this name
spec.loader.exec_module(gpu_scale)

LOG = """\
(MapWorker(MapBatches(EngineActor)) pid=11, ip=10.0.0.1) INFO engine actor: first batch (256 images) arrived 0.1s
(MapWorker(MapBatches(EngineActor)) pid=11, ip=10.0.0.1) INFO engine actor: 3 batches, 512 images, 40.0 images/s; x
(MapWorker(MapBatches(EngineActor)) pid=12, ip=10.0.0.2) INFO engine actor: 2 batches, 256 images, 30.5 images/s; x
(MapWorker(MapBatches(EngineActor)) pid=11, ip=10.0.0.1) INFO engine actor: 7 batches, 892 images, 56.4 images/s; x
"""


def test_the_actors_rate_is_each_actors_last_line_summed():
    assert gpu_scale.actor_rate(LOG) == 56.4 + 30.5
    assert gpu_scale.actor_rate("INFO engine actor: 1 batches, 2 images, 3.5 images/s; x") == 3.5
    assert gpu_scale.actor_rate("engine actor ready in 4.0s (backend turbomind resolved after 1.0s)") is None


def test_the_family_table_shows_the_steady_windows_commits_and_the_actors_rate(tmp_path):
    meta = dict(date="d", gpus=1, gpu="G", cpus=16, lmdeploy="l", ray="r", torch="t", images=1024, tokens=32)
    job = dict(
        steady_images_per_s=182.1, steady_commits=2, actor_images_per_s=56.4, end_to_end_images_per_s=14.1
    )
    job.update(gpu_util=[4.9], gpu_util_steady=[18.2], images=1024, error_rows=0)
    ceiling = dict(ceiling_images_per_s=70.7, ceiling_gpu_util=[30.2])

    def row() -> str:
        f = tmp_path / "F.json"
        result = {
            "qwen3_vl": {"ceiling": ceiling, "job_1gpu": job},
            "meta": {**meta, "batch": 256, "command": "c"},
        }
        f.write_text(json.dumps(result))
        return gpu_scale.report_families([str(f)]).splitlines()[-1]

    assert "| 70.7 | - | 182.1 (2 commits) | 2.58x | 56.4 |" in row()
    job["life_images_per_s"] = 60.1
    assert "| 70.7 | 60.1 (**0.85x**) | 182.1 (2 commits) | 2.58x | 56.4 |" in row()
    assert row().endswith("| 1024 (0 errors) |")  # a run from before the count was kept
    job["served_without_engine"] = 0
    assert row().endswith("| 1024 (0 errors, 0 served without the engine) |")
    job["served_without_engine"] = 266  # duplicates the job captioned once, lmdeploy alone each time
    assert row().endswith("| 1024 (0 errors, 266 served without the engine (**ratio flattered**)) |")


def test_the_family_table_has_a_row_per_job_cell_against_the_one_ceiling(tmp_path):
    meta = dict(date="d", gpus=1, gpu="G", cpus=16, lmdeploy="l", ray="r", torch="t", images=1024, tokens=128)
    job = dict(
        steady_images_per_s=70.0, end_to_end_images_per_s=30.0, gpu_util=[90.0], images=1024, error_rows=0
    )
    family = {
        "ceiling": dict(ceiling_images_per_s=70.0, ceiling_gpu_util=[99.0]),
        "job_1gpu": {**job, "cell": None},  # --part family without --job-cells
        "job_1gpu_256x4": {**job, "steady_images_per_s": 77.0, "cell": "256x4"},
    }
    f = tmp_path / "F.json"
    f.write_text(json.dumps({"qwen2_vl": family, "meta": {**meta, "batch": 256, "command": "c"}}))
    rows = gpu_scale.report_families([str(f)]).splitlines()[-2:]
    assert rows[0].startswith("| qwen2_vl | turbomind |") and "| 70.0 (? commits) | 1.00x |" in rows[0]
    assert (
        rows[1].startswith("| qwen2_vl (256x4) | turbomind |") and "| 77.0 (? commits) | 1.10x |" in rows[1]
    )


def test_a_ceiling_from_an_earlier_call_stands_only_beside_the_same_model_images_and_gpu(tmp_path):
    meta = dict(date="d", gpu="G", images=6144, tokens=128, shape="Qwen2-VL-7B", lmdeploy="l", command="a")
    ceiling = dict(ceiling_images_per_s=73.0, ceiling_gpu_util=[99.1])
    f = tmp_path / "F-first.json"
    f.write_text(json.dumps({"qwen2_vl": {"ceiling": ceiling}, "meta": meta}))
    same = {**meta, "command": "b"}  # another command line is fine: more job cells
    assert gpu_scale.earlier_ceiling(str(f), "qwen2_vl", same) == {**ceiling, "from": str(f)}
    for field, other in [("images", 4096), ("tokens", 32), ("shape", "Qwen2-VL-7B AWQ int4"), ("gpu", "H")]:
        with pytest.raises(SystemExit, match=f"not comparable with this run \\({field} "):
            gpu_scale.earlier_ceiling(str(f), "qwen2_vl", {**same, field: other})
    with pytest.raises(SystemExit, match="no qwen2_5_vl"):
        gpu_scale.earlier_ceiling(str(f), "qwen2_5_vl", same)
    job = dict(steady_images_per_s=73.0, end_to_end_images_per_s=30.0, gpu_util=[90.0], images=6144)
    family = {"ceiling": {**ceiling, "from": str(f)}, "job_1gpu": {**job, "error_rows": 0, "cell": "256x6"}}
    g = tmp_path / "F-second.json"
    g.write_text(
        json.dumps(
            {
                "qwen2_vl": family,
                "meta": {**same, "gpus": 1, "cpus": 16, "ray": "r", "torch": "t", "batch": 256},
            }
        )
    )
    row = gpu_scale.report_families([str(g)]).splitlines()[-1]
    assert "| 73.0 (measured by F-first.json) | - | 73.0 (? commits) | 1.00x |" in row


def test_the_sweep_table_shows_each_cells_commits_and_the_actors_rate(tmp_path):
    meta = dict(gpu="G", shape="Qwen2-VL-7B", tokens=128, images=2048, command="c")
    cell = dict(steady_images_per_s=40.0, steady_commits=6, actor_images_per_s=41.5, gpu_util_steady=[97.0])
    slow = {**cell, "steady_images_per_s": 20.0, "actor_images_per_s": None}
    f = tmp_path / "S.json"
    f.write_text(json.dumps({"sweep": {"256x2": cell, "32x1": slow}, "meta": meta}))
    table = gpu_scale.report_sweep(str(f)).splitlines()  # no first-batch-to-last-commit rate: the steady one
    assert table[-2] == "| 256 | 2 | - | 1.00 | 40.0 (6) | 41.5 | [97.0] |"
    assert table[-1] == "| 32 | 1 | - | 0.50 | 20.0 (6) | - | [97.0] |"
    cell["life_images_per_s"], slow["life_images_per_s"] = 30.0, 33.0  # this rate, where a cell has it, ranks
    f.write_text(json.dumps({"sweep": {"256x2": cell, "32x1": slow}, "meta": meta}))
    table = gpu_scale.report_sweep(str(f)).splitlines()
    assert table[-2] == "| 256 | 2 | 30.0 | 0.91 | 40.0 (6) | 41.5 | [97.0] |"
    assert table[-1] == "| 32 | 1 | 33.0 | 1.00 | 20.0 (6) | - | [97.0] |"


def test_the_life_rate_runs_from_the_first_batch_in_to_the_last_commit():
    log = """2026-12-07 16:36:44,700 INFO omnilmm_ray.stages: engine actor ready in 60.0s (backend turbomind resolved after 13.2s)
2026-12-07 16:36:51,283 INFO omnilmm_ray.stages: engine actor: first batch (256 images) arrived 0.3s after the actor was ready, done 6.4s later
2026-12-07 16:36:52,233 INFO omnilmm_ray.commit: committed shard /s/00001.tar (256 rows)
2026-12-07 16:37:05,000 INFO omnilmm_ray.commit: committed shard /s/00000.tar (256 rows)
2026-12-07 16:37:06,000 INFO omnilmm_ray.job: sealed
"""
    assert abs(gpu_scale.engine_life_rate(log, 512) - 512 / 20.0) < 1e-6  # 16:36:45.0 to 16:37:05.0
    assert gpu_scale.engine_life_rate(log.split("\n", 2)[2], 512) is None  # no actor start: no rate


def test_shards_for_fewer_images_than_built_are_a_view_of_the_first_tars(tmp_path):
    root = tmp_path / "shards"
    assert gpu_scale.make_shards(root, 12, per_shard=4) == root
    assert len(list(root.glob("*.tar"))) == 3
    view = gpu_scale.make_shards(root, 8, per_shard=4)
    assert view != root
    assert sorted(p.name for p in view.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert sum(1 for _ in gpu_scale.iter_images(view)) == 8
    assert gpu_scale.make_shards(root, 12, per_shard=4) == root  # built once: nothing is drawn again


def test_a_sweep_cell_names_its_batch_its_calls_in_flight_and_further_scale_settings(tmp_path):
    assert gpu_scale.sweep_cell("256x2") == {"batch_size": 256, "concurrent_batches": 2}
    assert gpu_scale.sweep_cell("64x4:max_batches_in_flight=8:shards_in_flight=null") == {
        "max_batches_in_flight": 8,
        "shards_in_flight": None,
        "batch_size": 64,
        "concurrent_batches": 4,
    }
    meta = dict(gpu="G", shape="Qwen2-VL-7B", tokens=128, images=2048, command="c")
    cell = dict(steady_images_per_s=40.0, steady_commits=6, actor_images_per_s=41.5, gpu_util_steady=[97.0])
    f = tmp_path / "S.json"
    f.write_text(json.dumps({"sweep": {"256x2:max_batches_in_flight=8": cell}, "meta": meta}))
    assert (
        gpu_scale.report_sweep(str(f)).splitlines()[-1].startswith("| 256 | 2 max_batches_in_flight=8 | - |")
    )


def test_the_long_runs_memory_series_reads_the_progress_lines_memory_part():
    from omnilmm_ray.memory import memory_text

    spec = importlib.util.spec_from_file_location("long_run", ROOT / "bench" / "long_run.py")
    long_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(long_run)
    head = "2026-12-07 10:00:{:02d},1 omnilmm_ray.job: progress: {:,}/~20,480 images (6%), shards 3/80 committed, memory: "
    mb, gb = 10**6, 10**9
    store = {"store_used": 1.2 * gb, "store_capacity": 18 * gb, "spilled": 2 * mb}
    lines = [
        head.format(0, 1204) + memory_text({"driver_rss": 612 * mb, "driver_private": 431 * mb, **store}),
        head.format(10, 2204) + memory_text({"driver_rss": 1.5 * gb, **store}),  # a log from before "private"
        head.format(20, 3204) + memory_text({"driver_rss": 700 * mb, "driver_private": 450 * mb}),
    ]
    rows = long_run.memory_series("\n".join(lines))
    assert [(r["images"], r["driver_mb"], r.get("driver_private_mb")) for r in rows] == [
        (1204, 612, 431),
        (2204, 1500, None),
        (3204, 700, 450),
    ]
    assert rows[0]["store_gb"] == 1.2 and rows[0]["spilled_mb"] == 2 and "store_gb" not in rows[2]


def test_the_benchmarks_images_are_all_distinct(tmp_path):
    """The job captions an in-run duplicate once (stages: the recent-captions cache) while lmdeploy alone captions
    every image, so a duplicate in the benchmark's shards would flatter the job. Unmarked, a quarter of these
    seeds repeat an earlier picture."""
    import hashlib
    import tarfile

    shards = gpu_scale.make_shards(tmp_path / "s", 600, per_shard=200)
    digests = []
    for t in sorted(shards.glob("*.tar")):
        with tarfile.open(t) as tar:
            digests += [hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.isfile()]
    assert len(digests) == 600 and len(set(digests)) == 600


def test_the_steady_window_spans_whole_rounds_of_calls_short_of_the_draining_last_round():
    # commit times (s) of 16 tars of 256 images, 7B, 128 tokens on one H100: four calls in flight commit from four
    # staggered streams, and the last four calls drain together (42.1-42.8 s)
    four = [0.0, 3.419, 6.545, 12.48, 13.833, 17.797, 20.518, 26.54, 29.148, 32.487, 35.586, 40.797]
    four = [(t, 256) for t in four + [42.137, 42.654, 42.81, 42.832]]
    rate, n, start, end = gpu_scale.steady_window(four, 4)
    assert (n, start, end) == (8, 3.419, 32.487)  # two rounds, from the 2nd commit
    assert abs(rate - 8 * 256 / (32.487 - 3.419)) < 1e-9
    assert gpu_scale.steady_window(four, 1)[0] > 1.15 * rate  # 10th-90th percentile alone: into the drain
    # two calls in flight (the same images): commits in pairs
    two = [0.0, 5.77, 6.503, 13.204, 13.821, 21.443, 21.956, 28.868, 29.493, 36.912, 37.439, 44.872, 45.499]
    two = [(t, 256) for t in two + [52.355, 52.894, 52.896]]
    assert gpu_scale.steady_window(two, 2) == (12 * 256 / (52.355 - 5.77), 12, 5.77, 52.355)
    assert gpu_scale.steady_window([(0.0, 5), (1.0, 5)], 4) == (5.0, 1, 0.0, 1.0)  # too short for a round
    assert gpu_scale.steady_window([(0.0, 5)], 4)[1] == 0
