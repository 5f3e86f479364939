"""The whole job on local Ray with each family's tiny random model in the GPU actor pool (engine.backend auto:
lmdeploy's pick), sealed, with captions that depend on the image."""

import json

import pyarrow.dataset as pads
import pytest
import yaml

from omnilmm_ray import cli
from omnilmm_ray.samples import build_samples
from omnilmm_ray.testing.tiny_families import BUILDERS

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    build_samples(root, shards=1, per_shard=12)
    return root / "webdataset"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_job_with_the_family(ray_gpu, tiny_family, shards, tmp_path, name):
    model, tiny = tiny_family(name), BUILDERS[name]
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "engine": {"model": model, "session_len": 2048, "cache_max_entry_count": 0.2},
                "generation": {"max_new_tokens": 16},
                "scale": {"batch_size": 8},
                "preprocess": {"max_side": 224},
            }
        )
    )
    out = tmp_path / "out"
    assert cli.main(["--config", str(cfg), "--input", str(shards), "--output", str(out)]) == 0
    run = sorted(out.glob("run=*"))[-1]
    assert (run / "_SUCCESS").exists()
    rows = pads.dataset(str(run), format="parquet").to_table().to_pylist()
    summary = json.loads((run / "_summary.json").read_text())
    print(f"{name}:", summary["this_attempt"], {r["key"]: r["caption"] for r in rows[:3]})
    assert len(rows) == 12 and summary["this_attempt"]["backend"] == tiny.backend
    # random weights may end the turn at once: an empty caption is an error row, anything else is a bug
    assert {r["error_kind"] for r in rows} <= {None, "empty_caption"}
    ok = [r for r in rows if r["error"] is None]
    assert len(ok) >= 9 and all(r["model"] == model and r["output_tokens"] > 0 for r in ok)
    # the images reached the model: their tokens are in every prompt, and the captions differ with them
    assert all(r["input_tokens"] >= tiny.image_tokens for r in ok)
    assert len({r["caption"] for r in ok}) > 1
