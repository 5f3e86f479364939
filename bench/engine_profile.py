"""Where an lmdeploy engine process spends its time: one GPU, the same images, several feeding modes.

Measures, in one process, on random weights with Qwen2-VL-2B's shapes (TurboMind, greedy, fixed output length):
- the model's image processor per image (lmdeploy runs it on one executor thread per engine), on the raw
  640x480 image and on one already resized to the size the processor would pick (`smart_resize`);
- the pipeline's images/s for one `pipe(list)` call over pre-decoded images: raw (the usual recipe), pre-resized,
  and with the processor bypassed (the same preprocessed tensors reused: the GPU-side ceiling).

    python bench/engine_profile.py --images 4096 [--out bench/results/engine-profile.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Describe this image in one detailed sentence."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--work", default="/tmp/omnilmm-bench")
    ap.add_argument("--out")
    ap.add_argument("--modes", default="raw,resized,bypass")
    args = ap.parse_args()

    import lmdeploy
    import torch
    from PIL import Image

    from omnilmm_ray.samples import draw, encode
    from omnilmm_ray.testing.tiny_vlm import QWEN2_VL_2B, build
    from omnilmm_ray.vision import smart_resize

    work = Path(args.work)
    model_dir = work / "Qwen2-VL-2B-shapes"
    model = str(model_dir if (model_dir / "config.json").exists() else build(model_dir, shapes=QWEN2_VL_2B))
    raw = [
        Image.open(io.BytesIO(encode(draw(i, size=(640, 480))[0], quality=90))).convert("RGB")
        for i in range(args.images)
    ]
    w, h = smart_resize(640, 480, max_pixels=QWEN2_VL_2B["max_pixels"])
    resized = [im.resize((w, h), Image.Resampling.BICUBIC) for im in raw]
    res: dict = {"images": args.images, "resized_to": [w, h], "torch_threads": torch.get_num_threads()}

    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model).image_processor
    res["processor_class"] = type(proc).__name__
    for name, ims in (("raw", raw[:200]), ("resized", resized[:200])):
        proc(images=[ims[0]], return_tensors="pt")
        t0 = time.perf_counter()
        for im in ims:
            proc(images=[im], return_tensors="pt")
        res[f"processor_ms_{name}"] = (time.perf_counter() - t0) / len(ims) * 1e3

    pipe = lmdeploy.pipeline(
        model,
        backend_config=lmdeploy.TurbomindEngineConfig(session_len=2048, cache_max_entry_count=0.5),
        log_level="ERROR",
    )
    gen = lmdeploy.GenerationConfig(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    pipe([(PROMPT, im) for im in raw[:512]], gen_config=gen)  # warm-up of comparable size

    vm = pipe.async_engine.vl_encoder.model
    real_preprocess = vm.preprocess
    cached = real_preprocess([{"role": "user", "content": [{"type": "image", "data": resized[0]}]}])[-1][
        "content"
    ][0]

    def bypass(messages, *a, **k):  # the processor's output for one image, reused: no CPU work per image
        messages.append({"role": "preprocess", "content": [dict(cached)]})
        return messages

    for mode in args.modes.split(","):
        ims = resized if mode in ("resized", "bypass") else raw
        vm.preprocess = bypass if mode == "bypass" else real_preprocess
        t0 = time.perf_counter()
        out = pipe([(PROMPT, im) for im in ims], gen_config=gen)
        dt = time.perf_counter() - t0
        res[f"pipe_{mode}_images_per_s"] = len(out) / dt
        res[f"pipe_{mode}_output_tokens"] = sum(r.generate_token_len for r in out)
    vm.preprocess = real_preprocess
    pipe.close()
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
