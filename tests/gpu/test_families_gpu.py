"""The engine adapter on each family's tiny random model (omnilmm_ray/testing/tiny_families.py): the backend
lmdeploy picks, and captions that depend on the image. The whole job per family: test_families_job_gpu.py."""

import hashlib

import numpy as np
import pytest

from omnilmm_ray.config import EngineConfig, GenerationConfig
from omnilmm_ray.samples import draw
from omnilmm_ray.testing.tiny_families import BUILDERS, SIZE

pytestmark = pytest.mark.gpu

PROMPT = "Describe this image in one detailed sentence."


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request, tiny_family):
    """(name, model folder, engine) with engine.backend=auto: the backend is lmdeploy's pick."""
    from omnilmm_ray.engines.lmdeploy_engine import LmdeployEngine

    model = tiny_family(request.param)
    cfg = EngineConfig(model=model, session_len=2048, cache_max_entry_count=0.2)
    engine = LmdeployEngine(cfg, GenerationConfig(max_new_tokens=16))
    yield request.param, model, engine
    engine.pipe.close()


def test_the_family_runs_on_its_backend_and_captions_from_the_image(family):
    name, _, engine = family
    tiny = BUILDERS[name]
    assert engine.backend == tiny.backend
    # The image check ran when the engine was built (engines/sight.py): each of its four images added at
    # least the image's tokens to the prompt, and they did not all get the same answer.
    print(f"{name}: image check {engine.sight}")
    assert min(engine.sight["image_tokens_added"]) >= tiny.image_tokens
    assert engine.sight["distinct_answers"] > 1
    images = [draw(i, size=(SIZE, SIZE))[0] for i in range(100, 116)]
    (text,) = engine.caption(PROMPT, [None])
    caps = engine.caption(PROMPT, images)
    assert all(c.error is None and c.output_tokens > 0 for c in caps)
    assert all(c.input_tokens - text.input_tokens >= tiny.image_tokens for c in caps)
    # random weights: two images may happen to get one caption, but not all sixteen
    assert len({c.text for c in caps}) > 1, "different images, different greedy captions"


def test_the_cpu_side_processor_gives_the_engines_captions(family):
    """Families whose processor the CPU workers run (models.py): patches identical to transformers'
    processor, and the same greedy captions as handing the engine the image."""
    import torch
    from transformers import AutoProcessor

    from omnilmm_ray.engines import Prepared
    from omnilmm_ray.models import cpu_processor
    from omnilmm_ray.vision import patches

    name, model, engine = family
    spec = cpu_processor(model)
    if spec is None:
        pytest.skip(f"{name}: the engine runs this family's image processor")
    assert engine.takes_prepared
    hf = AutoProcessor.from_pretrained(model).image_processor
    images, prepared, mismatched, total = [], [], 0, 0
    for i, size in enumerate([(224, 224), (200, 150), (150, 210), (97, 301)] * 4):
        im = draw(300 + i, size=size)[0]
        im = im.resize(spec.target_size(*im.size))  # what preprocess_batch does before `patches`
        data, gh, gw = patches(im, spec)
        ref = hf(images=[im], return_tensors="pt")
        assert ref["image_grid_thw"].tolist() == [[1, gh, gw]]
        ours = np.frombuffer(data, np.uint16)
        # in the model's dtype: bfloat16, float16 for the AWQ checkpoint (models.py)
        theirs = ref["pixel_values"].to(getattr(torch, spec.dtype)).view(torch.uint16).numpy().ravel()
        diff = np.abs(ours.astype(np.int32) - theirs.astype(np.int32))
        assert diff.max() <= 1, "at most one ulp apart (float32 rounding order)"
        mismatched, total = mismatched + int((diff > 0).sum()), total + diff.size
        images.append(im)
        prepared.append(Prepared(data, im.size, hashlib.sha256(data).digest(), spec.dtype))
    print(f"{name}: {spec.dtype} values one ulp apart: {mismatched}/{total}")
    a = engine.caption(PROMPT, images)
    b = engine.caption(PROMPT, prepared)
    assert [c.input_tokens for c in a] == [c.input_tokens for c in b]
    same = sum(x.text == y.text for x, y in zip(a, b))
    reproducible = [c.text for c in engine.caption(PROMPT, images)] == [c.text for c in a]
    print(
        f"{name}: identical captions, image vs patches: {same}/{len(a)}; image path reproducible: {reproducible}"
    )
    if not reproducible:  # TurboMind's int4 kernels on a random model: the same input varies run to run
        return
    assert same >= len(a) - 1 if mismatched else same == len(a)
