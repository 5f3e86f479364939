"""The engine gate: the first engine actor resolves the model's backend and shards are read only then."""

import pytest

from omnilmm_ray import gate
from omnilmm_ray.config import ConfigError, JobConfig
from omnilmm_ray.engines import Caption
from omnilmm_ray.engines.sight import ImageBlind, check_sight
from omnilmm_ray.job import run_job
from omnilmm_ray.samples import build_samples
from omnilmm_ray.stages import CaptionStage
from tests.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.integration


def _shard_gets(proxy: FaultyProxy) -> list[str]:
    return [path for method, path in proxy.requests if method == "GET" and ".tar" in path]


@pytest.mark.parametrize(
    "drill, reason",
    [
        ({"fake_refuse": "not a vision-language model lmdeploy can serve"}, "not a vision-language model"),
        # an engine that takes images and ignores their pixels (lmdeploy 0.18's PyTorch engine on MiniCPM-V)
        (
            {"fake_blind": True},
            "not captioned from the image by the fake engine: 4 different images get the same answer; use a",
        ),
    ],
)
def test_a_model_no_engine_serves_fails_before_any_shard_is_read(
    ray_local, s3, s3_endpoint, tmp_path, drill, reason
):
    build_samples(tmp_path / "in", shards=2, per_shard=3)
    bucket = "gate-" + next(iter(drill)).replace("_", "-")  # one bucket per drill
    s3.mkdir(bucket)
    s3.put(str(tmp_path / "in") + "/", f"{bucket}/in/", recursive=True)
    out = tmp_path / "out"
    with FaultyProxy(s3_endpoint) as proxy:
        cfg = JobConfig(
            inputs=[f"s3://{bucket}/in/webdataset"],
            output=str(out),
            input={"storage_options": {"endpoint_url": proxy.url}},
            engine={"backend": "fake", **drill},
        )
        with pytest.raises(ConfigError, match=f"engine.model: .*{reason}") as refused:
            run_job(cfg)
        assert "\n" not in str(refused.value)
        assert proxy.requests, "the shards were listed through the proxy"
        assert _shard_gets(proxy) == []
        assert not list(out.glob("run=*")), "a refused model leaves no run behind"

        # the same job with a model the engine serves reads them and writes the plan once rows come back
        summary = run_job(
            cfg.model_copy(update={"engine": cfg.engine.model_copy(update={k: None for k in drill})})
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


class _Stub:
    """An engine that answers the image check (engines/sight.py) as told."""

    def __init__(self, image_tokens: int, sees: bool):
        self.image_tokens, self.sees = image_tokens, sees

    def caption(self, prompts, images, gen=None):
        (im,) = images
        text = "same" if im is None or not self.sees else str(im.getpixel((5, 5)))
        return [Caption(text, 6 + (0 if im is None else self.image_tokens), 16, "length")]


def test_the_image_check_refuses_an_engine_that_does_not_caption_from_the_image():
    found = check_sight(_Stub(64, sees=True), "m", "lmdeploy X's turbomind engine")
    assert found == {"image_tokens_added": [64] * 4, "distinct_answers": 4, "of": 4, "reproducible": True}
    # the image's placeholder tokens reach the prompt, its pixels do not (MiniCPM-V on the PyTorch engine)
    with pytest.raises(
        ImageBlind, match="'m' is not captioned from the image by lmdeploy X's pytorch engine: 4"
    ):
        check_sight(_Stub(64, sees=False), "m", "lmdeploy X's pytorch engine")
    # no image tokens at all
    with pytest.raises(ImageBlind, match="an image adds 0 input tokens to the prompt and 4 different"):
        check_sight(_Stub(0, sees=False), "m", "e")


def test_a_refusal_stays_when_another_actor_opens_the_gate(tmp_path):
    """An actor of a family proven on a GPU opens the gate before its engine is built; one whose image check
    then fails shuts it, and no later open hides that (the driver reports the refusal)."""
    key = gate.new_key()
    gate.open_gate(key, "turbomind")
    gate.shut_gate(key, "engine.model: 'm' is not captioned from the image")
    gate.open_gate(key, "turbomind")
    assert gate.peek(key) == {"error": "engine.model: 'm' is not captioned from the image"}
    gate.clear(key)
    assert gate.peek(key) is None
    blind = JobConfig(inputs=["x"], output=str(tmp_path), engine={"backend": "fake", "fake_blind": True})
    key2 = gate.new_key()
    with pytest.raises(ImageBlind):
        CaptionStage(blind, str(tmp_path), gate_key=key2)
    with pytest.raises(gate.EngineRefused, match="not captioned from the image"):
        gate.wait_open(key2, 0)


@pytest.mark.parametrize("gpu_run, during_build", [("2026-12-01", {"backend": "turbomind"}), (None, None)])
def test_only_a_family_proven_on_a_gpu_reads_while_its_engine_builds(
    monkeypatch, tmp_path, gpu_run, during_build
):
    """A family whose GPU tests ran with this lmdeploy opens the gate at once (reads start beside the engine's
    build); any other only once its engine passed the image check. A failed check shuts it either way."""
    from omnilmm_ray import stages
    from omnilmm_ray.models import LMDEPLOY, Route

    route = Route(
        "m", "Qwen2VLForConditionalGeneration", "Qwen2-VL", "turbomind", None, None, gpu_run, LMDEPLOY
    )
    key, seen = gate.new_key(), []

    def blind_engine(*args, **kwargs):
        seen.append(gate.peek(key))
        raise ImageBlind("engine.model: 'm' is not captioned from the image")

    monkeypatch.setattr(stages, "resolve", lambda cfg: route)
    monkeypatch.setattr(stages, "make_engine", blind_engine)
    cfg = JobConfig(inputs=["x"], output=str(tmp_path), engine={"backend": "turbomind"})
    with pytest.raises(ImageBlind):
        CaptionStage(cfg, "", gate_key=key)
    assert seen == [during_build]
    with pytest.raises(gate.EngineRefused, match="not captioned from the image"):
        gate.wait_open(key, 0)
