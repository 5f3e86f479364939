"""Tiny random-weight models of the VLM families the job serves, one builder per family, each written the way
lmdeploy 0.18 loads the published checkpoints (key names, config fields) and built offline with the shared
pieces of tiny_vlm.py. The GPU tests (tests/gpu/test_families_gpu.py) run the engine adapter and the whole
job on each; `BUILDERS` names them. Needs torch, transformers 5 and tokenizers.

    python -m omnilmm_ray.testing.tiny_families qwen2_5_vl /tmp/tiny-Qwen2.5-VL
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from omnilmm_ray.testing.tiny_qwen import SIZE, config_dict, qwen
from omnilmm_ray.testing.tiny_vlm import (
    CHAT_TEMPLATE,
    QWEN2_VL_2B,
    TEXT,
    init_model,
    save_video_processor,
    save_weights,
    tokenizer,
    write_generation_config,
    write_json,
)


def _llava_layout(vision_tower: str = "vision_tower."):
    """Key names of checkpoints published before transformers 5 for LLaVA-style models (language_model.model.*,
    language_model.lm_head, vision_tower.*, multi_modal_projector.*), from transformers 5's model.*."""

    def rename(k: str) -> str:
        for new, old in (
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            (vision_tower, "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ):
            if k.startswith(old):
                return new + k[len(old) :]
        raise KeyError(f"unexpected weight {k}")

    return rename


INTERNVL_TOKENS = dict(
    start_image_token="<img>",
    end_image_token="</img>",
    context_image_token="<IMG_CONTEXT>",
    video_token="<video>",
)
# InternVL's processor expands <IMG_CONTEXT> to the image's tiles; lmdeploy writes its own placeholders
INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n"
)
INTERNVL_TILE = 112  # px per tile: (112 / 14)^2 patches, pixel-shuffled by 0.5 -> 16 tokens per tile


def _internvl(out: Path, seed: int, dtype: str, shapes: dict | None = None) -> Path:
    """InternVL3 in Hugging Face format (-hf): InternViT + MLP projector + a Qwen2 language model."""
    import transformers

    shapes = shapes or {}
    tile = shapes.get("tile", INTERNVL_TILE)

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS.values()]
    tok = tokenizer(special, INTERNVL_CHAT_TEMPLATE, **INTERNVL_TOKENS)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    text = {
        **TEXT,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "bos_token_id": pad,
        "eos_token_id": eos,
        "dtype": dtype,
        **shapes.get("text", {}),
    }
    vision = {
        **dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,  # head_dim 64
            intermediate_size=256,
            image_size=[tile, tile],
            patch_size=[14, 14],
            attention_bias=True,
            norm_type="layer_norm",
            use_qk_norm=False,
            use_mean_pooling=True,
            dtype=dtype,
        ),
        **shapes.get("vision", {}),
    }
    seq = (tile // 14) ** 2 // 4
    cfg = transformers.InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=seq,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    model = init_model(transformers.InternVLForConditionalGeneration, cfg, dtype, seed)

    save_weights(model, out, _llava_layout())  # the -hf checkpoints' (turbomind/models/internvl.py maps it)
    write_json(out, "config.json", config_dict(cfg, "InternVLForConditionalGeneration", dtype, text))
    write_generation_config(out, tok, eos=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>")
    proc = dict(
        size={"height": tile, "width": tile},
        crop_to_patches=False,
        min_patches=1,
        max_patches=4,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    transformers.GotOcr2ImageProcessor(**proc).save_pretrained(out)
    save_video_processor(out, "InternVLVideoProcessor", "InternVLProcessor", {}, proc["size"])
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE)
    write_json(
        out, "processor_config.json", {"processor_class": "InternVLProcessor", "image_seq_length": seq}
    )
    return out


# LLaVA-1.5's USER/ASSISTANT turns; each ends with a newline, so lmdeploy's HFChatTemplate (model.py) finds the
# end of a user turn (a turn ending in a space, as llava-hf's own template does, makes it find an earlier space)
LLAVA_CHAT_TEMPLATE = (  # newlines as expressions: transformers renders with trim_blocks
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% else %}{{ 'ASSISTANT: ' + message['content'] + '</s>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_IMAGE = 112  # CLIP input size: (112 / 14)^2 = 64 image tokens


def _llava(out: Path, seed: int, dtype: str) -> Path:
    """LLaVA-1.5 in Hugging Face format (llava-hf): CLIP vision tower + projector + a Llama language model."""
    import transformers

    special = ["<s>", "</s>", "<pad>", "<image>"]
    tok = tokenizer(special, LLAVA_CHAT_TEMPLATE, eos="</s>", pad="<pad>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    text = {
        **TEXT,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
        "bos_token_id": ids["<s>"],
        "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<pad>"],
        "dtype": dtype,
    }
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=LLAVA_IMAGE,
        patch_size=14,
        projection_dim=128,
        dtype=dtype,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        image_seq_length=(LLAVA_IMAGE // 14) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    model = init_model(transformers.LlavaForConditionalGeneration, cfg, dtype, seed)

    # llava-hf's layout, which lmdeploy's pytorch/models/llava.py loads; transformers 5 drops the CLIP tower's
    # `vision_model.` (conversion_mapping.py: CLIPVisionModel) that the published checkpoints have
    save_weights(model, out, _llava_layout("vision_tower.vision_model."))
    write_json(out, "config.json", config_dict(cfg, "LlavaForConditionalGeneration", dtype, text))
    write_generation_config(out, tok, eos=["</s>"], pad="<pad>", bos="<s>")
    transformers.CLIPImageProcessor(
        size={"shortest_edge": LLAVA_IMAGE}, crop_size={"height": LLAVA_IMAGE, "width": LLAVA_IMAGE}
    ).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(LLAVA_CHAT_TEMPLATE)
    write_json(
        out,
        "processor_config.json",
        {
            "processor_class": "LlavaProcessor",
            "patch_size": 14,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        },
    )
    return out


def _qwen2_5_vl_awq(out: Path, seed: int, dtype: str, shapes: dict | None = None) -> Path:
    """Qwen2.5-VL with its language model in AWQ int4 (tiny_awq.py), float16 like the published AWQ models."""
    from omnilmm_ray.testing.tiny_awq import quantize_folder

    return quantize_folder(qwen(out, seed, "float16", "qwen2_5_vl", shapes))


def _full_every_4th(n: int) -> list[str]:
    return ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)]


# Speed runs (bench/gpu_scale.py --family): random weights with the shapes of each family's small instruct model,
# from its published config.json (Qwen2.5-VL-3B, InternVL3-2B-hf, Qwen3-VL-2B). Qwen3.5's 2B layout (3 linear-
# attention layers to 1 full, head_dim 256, its Qwen3-VL-2B-sized vision tower) with sizes between the published
# 0.8B and 4B configs. Images: 448 x 448 at most (256 image tokens), one InternVL tile of 448 (256 tokens), as the
# Qwen2-VL-2B runs (tiny_vlm.QWEN2_VL_2B); the vocabulary stays tiny (512 ids).
_QWEN3_VISION_2B = dict(
    depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048
)
SHAPES = {
    "qwen2_5_vl": {
        "text": dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
        ),
        "vision": dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        "max_pixels": 448 * 448,
    },
    "internvl3_hf": {
        "text": dict(QWEN2_VL_2B["text"]),  # its language model, Qwen2.5-1.5B, has Qwen2-VL-2B's sizes
        "vision": dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
        ),
        "tile": 448,
    },
    "qwen3_vl": {
        "text": dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
        ),
        "vision": {
            **_QWEN3_VISION_2B,
            "deepstack_visual_indexes": [5, 11, 17],
            "num_position_embeddings": 2304,
        },
        "max_pixels": 448 * 448,
    },
    "qwen3_5": {
        "text": dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=24,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=256,
            layer_types=_full_every_4th(24),
            linear_num_key_heads=16,
            linear_num_value_heads=16,
        ),
        "vision": {**_QWEN3_VISION_2B, "num_position_embeddings": 2304},
        "max_pixels": 448 * 448,
    },
}
SHAPES["qwen2_5_vl_awq"] = SHAPES["qwen2_5_vl"]


@dataclass(frozen=True)
class Tiny:
    build: Callable[..., Path]  # (out, seed, dtype, shapes=None) -> out
    folder: str  # the model folder's name (lmdeploy matches some chat templates by path; these match none)
    backend: str  # what lmdeploy 0.18 picks under engine.backend=auto
    image_tokens: int  # at least this many input tokens for a SIZE x SIZE image


BUILDERS = {
    "qwen2_5_vl": Tiny(partial(qwen, family="qwen2_5_vl"), "tiny-Qwen2.5-VL", "turbomind", (SIZE // 28) ** 2),
    "qwen2_5_vl_awq": Tiny(_qwen2_5_vl_awq, "tiny-Qwen2.5-VL-AWQ", "turbomind", (SIZE // 28) ** 2),
    "internvl3_hf": Tiny(_internvl, "tiny-InternVL3-hf", "turbomind", (INTERNVL_TILE // 28) ** 2),
    "qwen3_5": Tiny(partial(qwen, family="qwen3_5"), "tiny-Qwen3.5", "turbomind", (SIZE // 32) ** 2),
    "qwen3_vl": Tiny(partial(qwen, family="qwen3_vl"), "tiny-Qwen3-VL", "pytorch", (SIZE // 32) ** 2),
    "llava_hf": Tiny(_llava, "tiny-llava-hf", "pytorch", (LLAVA_IMAGE // 14) ** 2),
}


def build(
    family: str, out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16", shapes: dict | None = None
) -> Path:
    """The family's tiny model; `shapes` (e.g. SHAPES[family]) gives it a published model's sizes instead."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if shapes is None:
        return BUILDERS[family].build(out, seed, dtype)
    return BUILDERS[family].build(out, seed, dtype, shapes=shapes)


if __name__ == "__main__":
    print(build(sys.argv[1], sys.argv[2]))
