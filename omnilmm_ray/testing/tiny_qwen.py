"""Tiny random-weight Qwen-family VLMs (Qwen2.5-VL, Qwen3-VL, Qwen3.5) for tiny_families.py: a Qwen tokenizer,
a Qwen2-VL-style image processor, mrope; saved under the key names lmdeploy 0.18 loads."""

from __future__ import annotations

from pathlib import Path

from omnilmm_ray.testing.tiny_vlm import (
    CHAT_TEMPLATE,
    MAX_PIXELS,
    MIN_PIXELS,
    TEXT,
    init_model,
    qwen_token_ids,
    rename_qwen2_vl,
    save_video_processor,
    save_weights,
    tokenizer,
    write_generation_config,
    write_json,
)

SIZE = 224  # the GPU tests' images: tiny_families' token counts are for this size


def config_dict(cfg, arch: str, dtype: str, text: dict) -> dict:
    """config.json: transformers' own dict, plus `dtype` in every sub-config (lmdeploy's PyTorch engine falls
    back to float16 otherwise) and the pre-v5 rope fields older readers look for."""
    d = cfg.to_dict()
    d["architectures"] = [arch]
    d["dtype"] = d["torch_dtype"] = dtype
    for sub in ("text_config", "vision_config"):
        if isinstance(d.get(sub), dict):
            d[sub]["dtype"] = d[sub]["torch_dtype"] = dtype
    rope = text.get("rope_parameters")
    if rope:
        d["text_config"].setdefault("rope_theta", rope["rope_theta"])
        d["text_config"]["rope_scaling"] = dict(rope)
    return d


def qwen(out: Path, seed: int, dtype: str, family: str, shapes: dict | None = None) -> Path:
    """Qwen2.5-VL, Qwen3-VL and Qwen3.5: a Qwen tokenizer, a Qwen2-VL-style processor, mrope. `shapes`
    ({"text": ..., "vision": ..., "max_pixels": ...}) overrides the tiny sizes (tiny_families.SHAPES)."""
    import transformers

    tok = tokenizer()
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    ids = qwen_token_ids(tok)
    if family == "qwen2_5_vl":
        arch, rename = "Qwen2_5_VLForConditionalGeneration", rename_qwen2_vl
        rope = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1_000_000.0}
        text = {**TEXT, "rope_parameters": rope}
        # head_dim 64: TurboMind's Qwen2 ViT takes 64 or 80; window 112 px as published, full attention in block 1
        vision = dict(
            depth=2,
            hidden_size=128,
            intermediate_size=256,
            num_heads=2,
            out_hidden_size=256,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            hidden_act="silu",
        )
        processor, video = "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"
        cfg_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        proc = dict(
            min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2
        )
        size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    else:
        # Qwen3-VL / Qwen3.5: patch 16, the processor's budget in `size`, mean and std 0.5; as published
        # (model.language_model.*, model.visual.*), which lmdeploy 0.18 loads as they are
        rename, processor, video = lambda k: k, "Qwen3VLProcessor", "Qwen3VLVideoProcessor"
        size = {"shortest_edge": 64 * 64, "longest_edge": SIZE * SIZE}
        proc = dict(
            patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
        vision = dict(
            depth=2,
            hidden_size=128,
            intermediate_size=256,
            num_heads=2,
            out_hidden_size=256,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=256,
            hidden_act="gelu_pytorch_tanh",
        )
        if family == "qwen3_vl":
            arch = "Qwen3VLForConditionalGeneration"
            rope = {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True}
            text = {**TEXT, "head_dim": 128, "rope_parameters": {**rope, "rope_theta": 5_000_000.0}}
            vision["deepstack_visual_indexes"] = [0]
            cfg_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
        else:  # Qwen3.5: Gated DeltaNet (linear attention) then gated full attention, as in the published 3:1
            arch = "Qwen3_5ForConditionalGeneration"
            rope = {"rope_type": "default", "mrope_section": [11, 11, 10], "mrope_interleaved": True}
            text = {
                **TEXT,
                "num_key_value_heads": 1,
                "head_dim": 256,
                "rope_parameters": {**rope, "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25},
                "layer_types": ["linear_attention", "full_attention"],
                "linear_num_key_heads": 2,
                "linear_num_value_heads": 2,
                "linear_key_head_dim": 128,
                "linear_value_head_dim": 128,
                "linear_conv_kernel_dim": 4,
            }
            cfg_cls, model_cls = transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration
    shapes = shapes or {}
    if (
        "max_pixels" in shapes
    ):  # the image budget of the speed runs (448 x 448 -> 256 image tokens at patch 14)
        if "min_pixels" in proc:
            proc["max_pixels"] = shapes["max_pixels"]
        size = {**size, "longest_edge": shapes["max_pixels"]}
    text = {**text, **shapes.get("text", {}), "bos_token_id": pad, "eos_token_id": eos, "dtype": dtype}
    vision = {**vision, **shapes.get("vision", {})}
    cfg = cfg_cls(text_config=text, vision_config={**vision, "dtype": dtype}, **ids)
    model = init_model(model_cls, cfg, dtype, seed)
    save_weights(model, out, rename)
    write_json(out, "config.json", config_dict(cfg, arch, dtype, text))
    write_generation_config(out, tok, eos=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>")
    transformers.Qwen2VLImageProcessor(**proc, size=size).save_pretrained(out)
    save_video_processor(out, video, processor, proc, size)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    write_json(out, "processor_config.json", {"processor_class": processor})
    return out
