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


def test_the_engine_showed_it_captions_from_the_image(turbomind):
    """engines/sight.py ran when the engine was built: 64 image tokens (224x224) plus the vision markers."""
    print("image check:", turbomind.sight)
    assert all(64 <= n <= 68 for n in turbomind.sight["image_tokens_added"])
    assert turbomind.sight["distinct_answers"] > 1


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


def test_patches_from_the_cpu_workers_match_the_engines_own_processor(turbomind, tiny_model):
    """vision.py reproduces the model's processor: same bfloat16 patches as transformers' processor, and the
    same greedy captions as handing TurboMind the image."""
    import hashlib

    import numpy as np
    import torch
    from transformers import AutoProcessor

    from omnilmm_ray.engines import Prepared
    from omnilmm_ray.models import cpu_processor
    from omnilmm_ray.vision import patches

    spec = cpu_processor(tiny_model)
    assert spec is not None and turbomind.takes_prepared
    hf = AutoProcessor.from_pretrained(tiny_model).image_processor
    images, prepared, mismatched, total = [], [], 0, 0
    for i, size in enumerate([(224, 224), (200, 150), (150, 210), (97, 301)] * 8):
        im, _ = draw(300 + i, size=size)
        im = im.resize(spec.target_size(*im.size))  # what preprocess_batch does before `patches`
        data, gh, gw = patches(im, spec)
        ref = hf(images=[im], return_tensors="pt")
        assert ref["image_grid_thw"].tolist() == [[1, gh, gw]]
        ours = np.frombuffer(data, np.uint16)
        theirs = ref["pixel_values"].to(torch.bfloat16).view(torch.uint16).numpy().ravel()
        assert ours.shape == theirs.shape
        diff = np.abs(ours.astype(np.int32) - theirs.astype(np.int32))
        assert diff.max() <= 1, "at most one bfloat16 ulp apart (float32 rounding order)"
        mismatched, total = mismatched + int((diff > 0).sum()), total + diff.size
        images.append(im)
        prepared.append(Prepared(data, im.size, hashlib.sha256(data).digest(), spec.dtype))
    print(f"bfloat16 values one ulp apart: {mismatched}/{total}")
    assert mismatched / total < 1e-3
    a = turbomind.caption(PROMPT, images)
    b = turbomind.caption(PROMPT, prepared)
    assert [c.input_tokens for c in a] == [c.input_tokens for c in b]
    same = sum(x.text == y.text for x, y in zip(a, b))
    print(f"identical captions, image vs patches: {same}/{len(a)}")
    assert same >= len(a) - 1 if mismatched else same == len(a)
