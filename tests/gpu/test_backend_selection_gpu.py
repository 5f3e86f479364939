"""Backend auto-selection and refusing models before any shard is read."""

import json
import logging

import pytest

from omnilmm_ray import cli
from omnilmm_ray.config import EngineConfig
from omnilmm_ray.samples import build_samples

pytestmark = pytest.mark.gpu


def test_unsupported_by_turbomind_routes_to_pytorch(tmp_path, caplog):
    from transformers import LlavaConfig

    from omnilmm_ray.engines.lmdeploy_engine import resolve_backend

    d = tmp_path / "llava"
    d.mkdir()
    cfg = LlavaConfig().to_dict()
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    (d / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING):
        assert resolve_backend(EngineConfig(model=str(d))) == "pytorch"
    assert "routing to lmdeploy's PyTorch engine" in caplog.text
    with pytest.raises(ValueError, match="TurboMind does not support"):
        resolve_backend(EngineConfig(model=str(d), backend="turbomind"))


def test_tiny_qwen2vl_auto_picks_turbomind(tiny_model):
    from omnilmm_ray.engines.lmdeploy_engine import resolve_backend

    assert resolve_backend(EngineConfig(model=tiny_model)) == "turbomind"


def test_unknown_model_fails_before_any_shard_is_read(tmp_path, capsys):
    d = tmp_path / "mystery"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["MysteryVLForCausalLM"],
                "model_type": "llama",
                "hidden_size": 64,
                "num_attention_heads": 2,
            }
        )
    )
    build_samples(tmp_path / "in", shards=1, per_shard=4)
    out = tmp_path / "out"
    rc = cli.main(["--input", str(tmp_path / "in" / "webdataset"), "--output", str(out), "--model", str(d)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(d) in err and "engine.model" in err
    assert not list(out.glob("run=*")), "no run was planned, so no shard was read"
