"""Settings the pipeline gives Ray Data: checked on the dataset as its executor will read them."""

import pytest

from omnilmm_ray.config import JobConfig
from omnilmm_ray.pipeline import build_dataset
from omnilmm_ray.samples import build_samples
from omnilmm_ray.sources import plan_shards

pytestmark = pytest.mark.integration


def test_engine_actors_are_kept_until_the_inputs_run_out_and_reads_start_beside_them(ray_local, tmp_path):
    build_samples(tmp_path / "in", shards=1, per_shard=2)
    cfg = JobConfig(
        inputs=[str(tmp_path / "in" / "webdataset")],
        output=str(tmp_path / "out"),
        engine={"backend": "fake"},
        scale={"min_actors": 1, "max_actors": 2},
    )
    ds = build_dataset(plan_shards(cfg.inputs, cfg.input), cfg, str(tmp_path / "out"), None)
    # Ray Data's autoscaler reads its thresholds from `autoscaling_config` (a plain attribute on the context
    # would be ignored): a negative one means never shrink by utilisation, only once the inputs are consumed.
    assert ds.context.autoscaling_config.actor_pool_util_downscaling_threshold < 0
    # Reads are not held back until the actors are up (they wait at the engine gate instead, which opens
    # when the backend is resolved, before the engine is built): a positive value would make Ray Data's
    # executor block on the actors' start before it launches any task.
    assert ds.context.wait_for_min_actors_s <= 0
