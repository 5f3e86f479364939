"""Two named prompts per image through TurboMind, in one engine call per batch (engine adapter and job)."""

import json

import pyarrow.dataset as pads
import pytest
import yaml

from omnilmm_ray import cli
from omnilmm_ray.config import EngineConfig, GenerationConfig
from omnilmm_ray.samples import build_samples, draw

pytestmark = pytest.mark.gpu

PROMPTS = {"alt": "Write a short alt text for this image.", "detailed": "Describe this image in detail."}


def test_engine_takes_one_prompt_per_image_and_retry_settings(tiny_model):
    from omnilmm_ray.engines.lmdeploy_engine import LmdeployEngine

    cfg = EngineConfig(backend="turbomind", model=tiny_model, session_len=2048, cache_max_entry_count=0.2)
    engine = LmdeployEngine(cfg, GenerationConfig(max_new_tokens=8))
    try:
        images = [draw(i, size=(224, 224))[0] for i in range(4)]
        prompts = [p for _ in images for p in PROMPTS.values()]
        caps = engine.caption(prompts, [im for im in images for _ in PROMPTS])
        assert len(caps) == 8 and all(c.error is None for c in caps)
        # the prompts differ in length: so do the input tokens of an image's two requests
        assert all(caps[2 * i].input_tokens != caps[2 * i + 1].input_tokens for i in range(4))
        alone = engine.caption(PROMPTS["detailed"], images[:1])
        assert alone[0].text == caps[1].text  # greedy: the same answer batched with other prompts or alone
        longer = engine.caption(
            prompts[:2], images[:1] * 2, GenerationConfig(max_new_tokens=24, min_new_tokens=24)
        )
        assert all(c.output_tokens == 24 for c in longer)
    finally:
        engine.pipe.close()


def test_job_two_named_prompts_turbomind(ray_gpu, tiny_model, tmp_path):
    build_samples(tmp_path / "in", shards=2, per_shard=16)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "prompts": PROMPTS,
                "engine": {
                    "backend": "turbomind",
                    "model": tiny_model,
                    "session_len": 2048,
                    "cache_max_entry_count": 0.2,
                },
                "generation": {"max_new_tokens": 16},
                "scale": {"batch_size": 8},
                "preprocess": {"max_side": 224},
            }
        )
    )
    out = tmp_path / "out"
    assert (
        cli.main(["--config", str(cfg), "--input", str(tmp_path / "in" / "webdataset"), "--output", str(out)])
        == 0
    )
    run = sorted(out.glob("run=*"))[-1]
    rows = pads.dataset(str(run), format="parquet").to_table().to_pylist()
    assert len(rows) == 32
    # random weights may end the turn at once: an empty answer is an error row, anything else is a bug
    assert {r["error_kind"] for r in rows} <= {None, "empty_caption"}
    ok = [r for r in rows if r["error"] is None]
    assert len(ok) >= 0.8 * len(rows)  # a row needs both answers non-empty
    for r in ok:
        for name, prompt in PROMPTS.items():
            assert r[f"caption_{name}"] and r[f"prompt_{name}"] == prompt
            assert 0 < r[f"output_tokens_{name}"] <= 16 and r[f"flags_{name}"] is not None
        assert r["input_tokens"] == r["input_tokens_alt"] + r["input_tokens_detailed"]
        assert r["input_tokens_alt"] != r["input_tokens_detailed"]
    summary = json.loads((run / "_summary.json").read_text())
    assert summary["this_attempt"]["backend"] == "turbomind" and "by_flag" in summary["quality"]
    print("two prompts, turbomind:", summary["this_attempt"], summary["quality"])
