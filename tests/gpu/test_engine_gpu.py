"""The engine adapter against the real lmdeploy TurboMind engine."""

import pytest

from omnilmm_ray.config import EngineConfig, GenerationConfig
from omnilmm_ray.samples import draw

pytestmark = pytest.mark.gpu

PROMPT = "Describe this image in one detailed sentence."


@pytest.fixture(scope="module")
def turbomind(tiny_model):
    from omnilmm_ray.engines.lmdeploy_engine import LmdeployEngine

    cfg = EngineConfig(backend="turbomind", model=tiny_model, session_len=2048, cache_max_entry_count=0.2)
    engine = LmdeployEngine(cfg, GenerationConfig(max_new_tokens=24))
    yield engine
    engine.pipe.close()


def test_captions_256_images_each_response_mapped(turbomind):
    images = [draw(i, size=(224, 224))[0] for i in range(256)]
    caps = turbomind.caption(PROMPT, images)
    assert turbomind.backend == "turbomind"
    assert len(caps) == 256
    for c in caps:
        assert c.error is None
        assert c.text, "every caption has text (empty Response.text is re-decoded from token_ids)"
        assert c.input_tokens > 64  # 64 image tokens for a 224x224 image, plus the prompt
        assert 0 < c.output_tokens <= 24
        assert c.finish_reason in ("stop", "length")
    print(f"redecoded empty Response.text: {turbomind.redecoded}/256")


def test_greedy_is_deterministic_and_the_image_reaches_the_model(turbomind):
    a, _ = draw(1, size=(224, 224))
    b, _ = draw(2, size=(224, 224))
    first = turbomind.caption(PROMPT, [a, a, b])
    again = turbomind.caption(PROMPT, [a])
    assert first[0].text == first[1].text == again[0].text
    # Different pixels -> different generated tokens (random weights, but deterministic given the input)
    many = turbomind.caption(PROMPT, [draw(i, size=(224, 224))[0] for i in range(100, 132)])
    assert len({c.text for c in many}) > 1
    assert first[0].text != first[2].text or len({c.text for c in many}) >= 8
    # A smaller image is fewer image tokens: 112x112 -> 16 instead of 64, so the image is what is counted
    small = turbomind.caption(PROMPT, [a.resize((112, 112))])
    assert first[0].input_tokens - small[0].input_tokens == 48
