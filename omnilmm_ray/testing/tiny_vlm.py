"""Build a tiny, randomly initialised Qwen2-VL that lmdeploy (TurboMind and PyTorch engines) accepts, and
the pieces every tiny family model shares (tiny_families.py): tokenizer, random init, weight files.

No downloads: the tokenizer is a byte-level BPE trained on the spot, the weights are random. The model
writes nonsense, but every stage of the real engine runs on it (image processor, vision tower, LM,
detokenizer), which is what the GPU tests need. Needs torch, transformers (>= 4.45) and tokenizers.

    python -m omnilmm_ray.testing.tiny_vlm /tmp/tiny-qwen2-vl
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' "
    "%}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 512
TEXT = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    vocab_size=VOCAB,
    tie_word_embeddings=False,
)
ROPE = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1_000_000.0}
VISION = dict(
    depth=2,
    embed_dim=128,
    num_heads=2,
    mlp_ratio=4,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    in_channels=3,
    hidden_size=256,
    hidden_act="quick_gelu",
)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 224 * 224
# Qwen2-VL-2B-Instruct's published shapes (config.json), for speed measurements with random weights. The
# vocabulary stays tiny: only the embedding and LM head (~10 % of the parameters) are smaller than the real one.
QWEN2_VL_2B = {
    "text": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    ),
    "vision": dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536),
    "max_pixels": 448 * 448,
}


def tokenizer(
    special: list[str] = SPECIAL_TOKENS,
    chat_template: str = CHAT_TEMPLATE,
    eos: str = "<|im_end|>",
    pad: str = "<|endoftext|>",
    vocab: int = VOCAB,
    **named_tokens: str,
):
    """A byte-level BPE of `vocab` ids (special tokens included) with a chat template; `named_tokens`
    (e.g. context_image_token="<IMG_CONTEXT>") become attributes, as a model's tokenizer_config declares."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "a photo of a red circle on a blue background",
        "Describe this image in one sentence.",
        "the quick brown fox jumps over the lazy dog",
        "You are a helpful assistant.",
        "system user assistant",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - len(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 50, trainer)
    tok.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        additional_special_tokens=special,
        **({"extra_special_tokens": named_tokens} if named_tokens else {}),
    )
    fast.chat_template = chat_template
    # Cover every id the model can emit, or detokenizing a random model's output meets unknown ids.
    fast.add_tokens([f"<|extra_{i}|>" for i in range(vocab - len(fast))])
    assert len(fast) == vocab, len(fast)
    return fast


def qwen_token_ids(tok) -> dict:
    """The config's ids of the Qwen-VL image and video tokens."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def init_model(model_cls, cfg, dtype: str, seed: int):
    """`model_cls(cfg)` with random weights that make different inputs give different outputs."""
    import torch

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = model_cls(cfg).to(getattr(torch, dtype))
    with torch.no_grad():  # default init is too flat for a 2-layer model: make different inputs differ
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(std=min(0.05, 0.8 / p.shape[-1] ** 0.5))
    return model


def save_weights(model, out: Path, rename: Callable[[str], str] = lambda k: k) -> dict:
    """Write model.safetensors under the key names lmdeploy 0.18 loads (`rename` maps transformers 5's)."""
    from safetensors.torch import save_file

    state = {rename(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return state


def write_json(out: Path, name: str, obj: dict) -> None:
    (out / name).write_text(json.dumps(obj, indent=1))


def write_generation_config(out: Path, tok, eos: list[str], pad: str, bos: str | None = None) -> None:
    write_json(
        out,
        "generation_config.json",
        {
            "bos_token_id": tok.convert_tokens_to_ids(bos or pad),
            "eos_token_id": [tok.convert_tokens_to_ids(t) for t in eos],
            "pad_token_id": tok.convert_tokens_to_ids(pad),
            "do_sample": False,
        },
    )


def save_video_processor(out: Path, cls_name: str, processor_class: str, kwargs: dict, size: dict) -> None:
    """A processor bundles a video processor, which needs torchvision; write its config by hand when the
    class cannot be built here (the image path never uses it)."""
    import transformers

    try:
        getattr(transformers, cls_name)(**kwargs).save_pretrained(out)
    except ImportError:
        write_json(
            out,
            "video_preprocessor_config.json",
            {"video_processor_type": cls_name, "processor_class": processor_class, **kwargs, "size": size},
        )


def rename_qwen2_vl(k: str) -> str:
    """lmdeploy 0.18 loads the original Qwen2-VL / Qwen2.5-VL key names; transformers 5 saves
    model.language_model.* and model.visual.*."""
    return k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


def build(out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16", shapes: dict | None = None) -> Path:
    """Write the model folder; `shapes` (e.g. QWEN2_VL_2B) overrides the tiny text/vision sizes, the image
    processor's max_pixels and, with `text.vocab_size`, the vocabulary (the tokenizer then covers every id)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = shapes or {}
    tok = tokenizer(vocab=shapes.get("text", {}).get("vocab_size", VOCAB))
    text = {
        **TEXT,
        **shapes.get("text", {}),
        "rope_theta": ROPE["rope_theta"],
        "rope_scaling": {"type": "mrope", **ROPE},
        "rope_parameters": ROPE,
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    vision = {**VISION, **shapes.get("vision", {}), "dtype": dtype}
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **qwen_token_ids(tok))
    model = init_model(Qwen2VLForConditionalGeneration, cfg, dtype, seed)
    save_weights(model, out, rename_qwen2_vl)
    cfg_dict = cfg.to_dict()
    cfg_dict.update({k: v for k, v in text.items() if k not in cfg_dict or k in ("rope_scaling", "dtype")})
    cfg_dict["architectures"] = ["Qwen2VLForConditionalGeneration"]
    cfg_dict["model_type"] = "qwen2_vl"
    cfg_dict["torch_dtype"] = cfg_dict["dtype"] = dtype
    write_json(out, "config.json", cfg_dict)
    write_generation_config(out, tok, eos=["<|im_end|>", "<|endoftext|>"], pad="<|endoftext|>")
    proc = dict(
        min_pixels=MIN_PIXELS,
        max_pixels=shapes.get("max_pixels", MAX_PIXELS),
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    Qwen2VLImageProcessor(**proc).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    size = {"shortest_edge": proc["min_pixels"], "longest_edge": proc["max_pixels"]}
    save_video_processor(out, "Qwen2VLVideoProcessor", "Qwen2VLProcessor", proc, size)
    write_json(out, "processor_config.json", {"processor_class": "Qwen2VLProcessor"})
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "tiny-qwen2-vl"))
