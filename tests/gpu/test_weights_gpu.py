"""The real engine on a model read from object storage: the tiny Qwen2-VL uploaded to the local S3 server."""

from pathlib import Path

import pytest

from omnilmm_ray.config import EngineConfig, GenerationConfig
from omnilmm_ray.samples import draw

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def test_turbomind_serves_a_model_from_s3(tiny_model, s3, tmp_path):
    s3.mkdir("gpu-models")
    s3.put(tiny_model, "gpu-models/tiny-Qwen2-VL", recursive=True)
    uri = "s3://gpu-models/tiny-Qwen2-VL/"
    from omnilmm_ray.engines.lmdeploy_engine import LmdeployEngine

    cfg = EngineConfig(
        backend="turbomind", model=uri, cache_dir=str(tmp_path), session_len=2048, cache_max_entry_count=0.2
    )
    engine = LmdeployEngine(cfg, GenerationConfig(max_new_tokens=16))
    try:
        caps = engine.caption("Describe this image.", [draw(i, size=(224, 224))[0] for i in range(4)])
    finally:
        engine.pipe.close()
    assert engine.backend == "turbomind"
    assert all(c.error is None and c.text for c in caps)
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    # the folder name keeps the model's, so lmdeploy still matches its built-in qwen2-vl chat template
    assert entry.name.startswith("tiny-Qwen2-VL-")
    local = sorted(p.relative_to(tiny_model) for p in Path(tiny_model).rglob("*") if p.is_file())
    assert sorted(p.relative_to(entry) for p in entry.rglob("*") if p.is_file()) == local
