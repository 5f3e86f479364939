"""The published small-model shapes the speed runs build (tiny_families.SHAPES) are consistent with themselves
and with what TurboMind takes, checked without torch: a wrong entry would otherwise surface only as a failed
build or engine start on the GPU machine."""

import pytest

from omnilmm_ray.testing.tiny_families import BUILDERS, SHAPES


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_shapes_fit_together(family):
    shapes = SHAPES[family]
    text, vision = shapes["text"], shapes["vision"]
    assert family in BUILDERS
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    if "head_dim" not in text:
        assert text["hidden_size"] % text["num_attention_heads"] == 0
    assert head_dim in (64, 128, 256)  # head sizes TurboMind's attention kernels are built for
    assert text["num_attention_heads"] % text["num_key_value_heads"] == 0
    layers = text.get("layer_types")
    if layers is not None:
        assert len(layers) == text["num_hidden_layers"]
        assert layers[-1] == "full_attention"
    if "out_hidden_size" in vision:  # the vision merger writes into the language model's embedding space
        assert vision["out_hidden_size"] == text["hidden_size"]
    depth = vision.get("depth", vision.get("num_hidden_layers"))
    for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        assert all(0 <= i < depth for i in vision.get(key, []))
    heads = vision.get("num_heads", vision.get("num_attention_heads"))
    assert vision["hidden_size"] % heads == 0
    pixels = shapes.get("max_pixels", shapes.get("tile", 0) ** 2)
    assert pixels == 448 * 448  # every family sees the same image budget, as the Qwen2-VL-2B runs do
