"""The model's image processor on the CPU workers (vision.py): sizes, patch layout, bfloat16 values, config."""

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from omnilmm_ray import cli
from omnilmm_ray.models import cpu_processor
from omnilmm_ray.samples import build_samples
from omnilmm_ray.vision import VisionSpec, patches, qwen2_vl_spec, smart_resize

QWEN2_CONFIG = {"architectures": ["Qwen2VLForConditionalGeneration"]}
# Qwen2-VL-2B-Instruct's published preprocessor_config.json
QWEN2_PROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
}


def test_smart_resize_matches_qwen2_vl_rounding():
    assert smart_resize(640, 480, max_pixels=448 * 448) == (504, 364)  # shrunk to the pixel budget
    assert smart_resize(448, 336, max_pixels=12845056) == (448, 336)  # already multiples of 28
    assert smart_resize(450, 330, max_pixels=12845056) == (448, 336)  # rounded to the nearest multiple
    assert smart_resize(30, 20, min_pixels=56 * 56) == (84, 56)  # grown to the minimum
    w, h = smart_resize(4000, 30)
    assert w % 28 == 0 and h == 28


def test_spec_from_the_processor_config():
    spec = qwen2_vl_spec("Qwen2VLForConditionalGeneration", QWEN2_PROCESSOR)
    assert spec.min_pixels == 3136 and spec.max_pixels == 12845056 and spec.factor == 28
    assert spec.patch_dim == 1176
    # transformers 5 writes the budget as `size`
    tf5 = {k: v for k, v in QWEN2_PROCESSOR.items() if "pixels" not in k}
    tf5["size"] = {"shortest_edge": 3136, "longest_edge": 200704}
    assert qwen2_vl_spec("Qwen2VLForConditionalGeneration", tf5).max_pixels == 200704
    assert (
        qwen2_vl_spec("Qwen2VLForConditionalGeneration", {**QWEN2_PROCESSOR, "do_normalize": False}) is None
    )


def test_the_processor_is_read_from_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_CONFIG))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN2_PROCESSOR))
    assert cpu_processor(str(tmp_path)).arch == "Qwen2VLForConditionalGeneration"
    assert cpu_processor(str(tmp_path), "pytorch") is None  # the PyTorch engine runs its own
    assert cpu_processor(str(tmp_path / "missing")) is None
    assert cpu_processor("Qwen/Qwen2-VL-2B-Instruct") is None  # a hub id the driver has no files for


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_patch_layout_and_values_against_a_loop_reference():
    spec = VisionSpec(arch="Qwen2VLForConditionalGeneration", min_pixels=1, max_pixels=10**9)
    rng = np.random.default_rng(0)
    w, h = 84, 56  # 6x4 patches, 3x2 merge groups
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    data, gh, gw = patches(Image.fromarray(arr), spec)
    assert (gh, gw) == (4, 6)
    got = _bf16_to_f32(np.frombuffer(data, np.uint16)).reshape(gh * gw, spec.patch_dim)
    norm = (arr / 255.0 - np.array(spec.image_mean)) / np.array(spec.image_std)
    # Reference, written as loops: merge groups row-major, the 2x2 patches inside a group row-major; inside
    # a patch: channel, then the (repeated) frame, then pixel rows and columns.
    p, m = spec.patch_size, spec.merge_size
    k = 0
    for by in range(gh // m):
        for bx in range(gw // m):
            for iy in range(m):
                for ix in range(m):
                    y0, x0 = (by * m + iy) * p, (bx * m + ix) * p
                    expect = [
                        norm[y0 + yy, x0 + xx, c]
                        for c in range(3)
                        for _ in range(spec.temporal_patch_size)
                        for yy in range(p)
                        for xx in range(p)
                    ]
                    # bfloat16 keeps 8 significant bits: relative error at most 2^-8
                    np.testing.assert_allclose(got[k], expect, rtol=2**-8, atol=1e-6)
                    k += 1
    assert k == gh * gw


def test_float16_patches_for_a_float16_model():
    """An AWQ checkpoint runs in float16 on TurboMind: its patches are float16, the same layout."""
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))
    bf16 = VisionSpec(arch="Qwen2_5_VLForConditionalGeneration", min_pixels=1, max_pixels=10**9)
    f16 = VisionSpec(**{**bf16.to_dict(), "dtype": "float16"})
    (a, gh, gw), (b, gh2, gw2) = patches(im, bf16), patches(im, f16)
    assert (gh, gw) == (gh2, gw2) and len(a) == len(b)
    x16 = np.frombuffer(b, np.float16).astype(np.float32)
    np.testing.assert_allclose(x16, _bf16_to_f32(np.frombuffer(a, np.uint16)), rtol=2**-7, atol=1e-6)
    assert not np.array_equal(x16, _bf16_to_f32(np.frombuffer(a, np.uint16))), "float16 keeps more bits"


def test_bf16_rounds_to_nearest_even():
    from omnilmm_ray.vision import _bf16_bits

    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 0.0], np.float32)
    # 1+2^-8 is a tie between 1.0 and 1+2^-7: even mantissa (1.0) wins; 1+3*2^-8 rounds up to 1+2^-6
    assert list(_bf16_to_f32(_bf16_bits(x))) == [1.0, 1.0, 1.0 + 2**-6, -2.5, 0.0]


def test_patches_refuse_sizes_the_processor_would_not_produce():
    spec = VisionSpec(arch="Qwen2VLForConditionalGeneration", min_pixels=1, max_pixels=10**9)
    with pytest.raises(ValueError, match="multiple of 28"):
        patches(Image.new("RGB", (30, 28)), spec)


@pytest.mark.integration
def test_job_hands_the_engine_patches_when_the_model_processor_is_known(ray_local, tmp_path):
    build_samples(tmp_path / "in", shards=2, per_shard=6)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN2_CONFIG))
    (model / "preprocessor_config.json").write_text(json.dumps({**QWEN2_PROCESSOR, "max_pixels": 200704}))
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in" / "webdataset"), "--engine", "fake", "--model", str(model)]
    assert cli.main([*args, "--output", str(out)]) == 0
    t = pads.dataset(str(next(Path(out).glob("run=*"))), format="parquet").to_table().to_pylist()
    assert len(t) == 12 and all(r["error"] is None for r in t)
    assert all("given as patches" in r["caption"] for r in t)
    # the engine saw the processor's size (multiples of 28), not the resized image
    for r in t:
        w, h = (int(v) for v in r["caption"].split(" a ")[1].split(" ")[0].split("x"))
        assert w % 28 == 0 and h % 28 == 0
    # switched off, the same model gets resized images
    out2 = tmp_path / "out2"
    assert cli.main([*args, "--output", str(out2), "--config", str(_cfg(tmp_path))]) == 0
    t2 = pads.dataset(str(next(Path(out2).glob("run=*"))), format="parquet").to_table()
    assert not any("patches" in c for c in t2.column("caption").to_pylist())


def _cfg(tmp_path):
    p = tmp_path / "off.yaml"
    p.write_text("preprocess:\n  offload_processor: false\n")
    return p
