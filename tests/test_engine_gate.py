"""The engine gate: the first engine actor resolves the model's backend and shards are read only then."""

import pytest

from omnilmm_ray import gate
from omnilmm_ray.config import ConfigError, JobConfig
from omnilmm_ray.job import run_job
from omnilmm_ray.samples import build_samples
from omnilmm_ray.stages import CaptionStage
from tests.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.integration


def _shard_gets(proxy: FaultyProxy) -> list[str]:
    return [path for method, path in proxy.requests if method == "GET" and ".tar" in path]


def test_a_model_no_engine_serves_fails_before_any_shard_is_read(ray_local, s3, s3_endpoint, tmp_path):
    build_samples(tmp_path / "in", shards=2, per_shard=3)
    s3.mkdir("gate-in")
    s3.put(str(tmp_path / "in") + "/", "gate-in/in/", recursive=True)
    out = tmp_path / "out"
    with FaultyProxy(s3_endpoint) as proxy:
        cfg = JobConfig(
            inputs=["s3://gate-in/in/webdataset"],
            output=str(out),
            input={"storage_options": {"endpoint_url": proxy.url}},
            engine={"backend": "fake", "fake_refuse": "not a vision-language model lmdeploy can serve"},
        )
        with pytest.raises(ConfigError, match="engine.model: .*not a vision-language model"):
            run_job(cfg)
        assert proxy.requests, "the shards were listed through the proxy"
        assert _shard_gets(proxy) == []
        assert not list(out.glob("run=*")), "a refused model leaves no run behind"

        # the same job with a model the engine serves reads them and writes the plan once rows come back
        summary = run_job(
            cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"fake_refuse": None})})
        )
        assert summary["rows"] == 6 and len(_shard_gets(proxy)) >= 2
        assert summary["this_attempt"]["backend"] == "fake"


def test_no_engine_actor_starting_in_time_is_a_config_error(ray_local, tmp_path):
    """A real engine on a cluster without GPUs: the actors never start, the pool's start times out."""
    build_samples(tmp_path / "in", shards=1, per_shard=2)
    cfg = JobConfig(
        inputs=[str(tmp_path / "in" / "webdataset")],
        output=str(tmp_path / "out"),
        engine={"backend": "turbomind", "start_timeout_s": 3},
        preprocess={"offload_processor": False},
    )
    with pytest.raises(ConfigError, match=r"engine.tp: no engine actor started within 3s"):
        run_job(cfg, wait_for_gpus=True)
    assert not list((tmp_path / "out").glob("run=*"))


def test_the_engine_actor_opens_or_shuts_its_gate(tmp_path):
    ok = JobConfig(inputs=["x"], output=str(tmp_path), engine={"backend": "fake"})
    key = gate.new_key()
    with pytest.raises(gate.EngineNotStarted, match="within 0s"):
        gate.wait_open(key, 0)
    CaptionStage(ok, str(tmp_path), gate_key=key)
    assert gate.wait_open(key, 0) == "fake"
    refused = ok.model_copy(update={"engine": ok.engine.model_copy(update={"fake_refuse": "no"})})
    key2 = gate.new_key()
    with pytest.raises(ValueError, match="engine.model"):
        CaptionStage(refused, str(tmp_path), gate_key=key2)
    with pytest.raises(gate.EngineRefused, match="engine.model: .*: no"):
        gate.wait_open(key2, 0)
    assert gate.wait_open(key, 0) == "fake", "each pipeline has its own gate"
    gate.clear(key2)
    assert gate.peek(key2) is None


def test_a_refused_model_on_a_run_with_nothing_to_caption_is_a_config_error(ray_local, tmp_path):
    """A nightly run that finds nothing new starts no engine actor; the backend is still resolved before its
    plan is written, and a refusal is the same config error (exit 2) as when there is work."""
    build_samples(tmp_path / "in", shards=1, per_shard=2)
    cfg = JobConfig(
        inputs=[str(tmp_path / "in" / "webdataset")], output=str(tmp_path / "out"), engine={"backend": "fake"}
    )
    assert run_job(cfg)["rows"] == 2
    runs = sorted((tmp_path / "out").glob("run=*"))
    refused = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"fake_refuse": "not served"})})
    with pytest.raises(ConfigError, match="engine.model: .*not served"):
        run_job(refused)
    assert sorted((tmp_path / "out").glob("run=*")) == runs, "a refused model leaves no run behind"
