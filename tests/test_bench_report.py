"""bench/gpu_scale.py's reading of the job's log: the engine actors' own rate, beside the steady window."""

import importlib.util
import json
import sys
from pathlib import Path

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
    f = tmp_path / "F.json"
    f.write_text(
        json.dumps(
            {
                "qwen3_vl": {"ceiling": ceiling, "job_1gpu": job},
                "meta": {**meta, "batch": 256, "command": "c"},
            }
        )
    )
    row = gpu_scale.report_families([str(f)]).splitlines()[-1]
    assert "| 182.1 (2 commits) | **2.58x** | 56.4 |" in row


def test_the_sweep_table_shows_each_cells_commits_and_the_actors_rate(tmp_path):
    meta = dict(gpu="G", shape="Qwen2-VL-7B", tokens=128, images=2048, command="c")
    cell = dict(steady_images_per_s=40.0, steady_commits=6, actor_images_per_s=41.5, gpu_util_steady=[97.0])
    slow = {**cell, "steady_images_per_s": 20.0, "actor_images_per_s": None}
    f = tmp_path / "S.json"
    f.write_text(json.dumps({"sweep": {"256x2": cell, "32x1": slow}, "meta": meta}))
    table = gpu_scale.report_sweep(str(f)).splitlines()
    assert table[-2] == "| 256 | 2 | 40.0 (6) | 1.00 | 41.5 | [97.0] |"
    assert table[-1] == "| 32 | 1 | 20.0 (6) | 0.50 | - | [97.0] |"


def test_shards_for_fewer_images_than_built_are_a_view_of_the_first_tars(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_scale, "PER_SHARD", 4)
    root = tmp_path / "shards"
    assert gpu_scale.make_shards(root, 12) == root
    assert len(list(root.glob("*.tar"))) == 3
    view = gpu_scale.make_shards(root, 8)
    assert view != root
    assert sorted(p.name for p in view.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert sum(1 for _ in gpu_scale.iter_images(view)) == 8
    assert gpu_scale.make_shards(root, 12) == root  # built once: nothing is drawn again
