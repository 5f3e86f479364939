"""End-to-end captioning throughput on one GPU: lmdeploy's pipeline alone vs. this job, side by side.

Both sides caption the same JPEG shards with the same random-weight model of Qwen2-VL-2B's shapes
(omnilmm_ray.testing.tiny_vlm.QWEN2_VL_2B), TurboMind, greedy, the same generation settings.
- baseline: the usual single-process recipe — decode every image with PIL on the main thread, hand the
  list to `pipeline(...)` (lmdeploy batches it and resizes in its own processor), time bytes -> captions;
- job: `jobs/caption.py --engine turbomind` on local Ray (CPU decode/resize workers, one GPU actor),
  time from start to sealed output.
Both times include building the engine. The baseline runs twice (before and after the job) to show drift.

    python bench/gpu_throughput.py --images 3072 --out bench/results/gpu-throughput.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "Describe this image in one detailed sentence."
GEN = {"max_new_tokens": 32}


def make_shards(root: Path, n: int, per_shard: int = 256) -> list[Path]:
    from omnilmm_ray.samples import draw, encode, write_tar

    paths = []
    for s in range(0, n, per_shard):
        samples = [
            (f"{i:07d}", {"jpg": encode(draw(i, size=(640, 480))[0], quality=90)})
            for i in range(s, min(n, s + per_shard))
        ]
        paths.append(write_tar(root / f"{s // per_shard:05d}.tar", samples))
    return paths


def baseline(model: str, shard_dir: str) -> dict:
    """lmdeploy alone: decode on this thread, one pipeline call over the whole list."""
    import lmdeploy
    from PIL import Image

    t0 = time.perf_counter()
    pipe = lmdeploy.pipeline(
        model,
        backend_config=lmdeploy.TurbomindEngineConfig(session_len=2048, cache_max_entry_count=0.5),
        log_level="ERROR",
    )
    t_engine = time.perf_counter()
    images = []
    for p in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(p) as tar:
            for m in tar:
                images.append(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
    t_decoded = time.perf_counter()
    out = pipe([(PROMPT, im) for im in images], gen_config=lmdeploy.GenerationConfig(**GEN, do_sample=False))
    t1 = time.perf_counter()
    pipe.close()
    return {
        "images": len(out),
        "wall_s": t1 - t0,
        "engine_start_s": t_engine - t0,
        "decode_s": t_decoded - t_engine,
        "generate_s": t1 - t_decoded,
        "output_tokens": sum(r.generate_token_len for r in out),
    }


def job(model: str, shard_dir: str, out: str, batch_size: int, concurrent: int) -> dict:
    import pyarrow.dataset as pads

    from omnilmm_ray import cli

    cfg = Path(out + ".yaml")
    cfg.write_text(
        json.dumps(
            {
                "engine": {
                    "backend": "turbomind",
                    "model": model,
                    "session_len": 2048,
                    "cache_max_entry_count": 0.5,
                },
                "generation": GEN,
                "scale": {"batch_size": batch_size, "concurrent_batches": concurrent},
                "preprocess": {"max_side": 640},
            }
        )
    )  # = the image size: the engine sees the same pixels on both sides
    t0 = time.perf_counter()
    rc = cli.main(["--config", str(cfg), "--input", shard_dir, "--output", out])
    t1 = time.perf_counter()
    assert rc == 0, rc
    run = sorted(Path(out).glob("run=*"))[-1]
    t = pads.dataset(str(run), format="parquet").to_table(columns=["output_tokens", "error"])
    attempt = json.loads((run / "_summary.json").read_text())["this_attempt"]
    return {
        "images": t.num_rows,
        "wall_s": t1 - t0,
        "errors": t.num_rows - t.column("error").null_count,
        "pipeline_s": attempt["wall_s"],
        "output_tokens": sum(x or 0 for x in t.column("output_tokens").to_pylist()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3072)
    ap.add_argument("--work", default="/tmp/omnilmm-bench")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--jobs", default="128x1,512x1,512x2", help="job variants: BATCHSIZExCONCURRENT_BATCHES,..."
    )
    ap.add_argument("--side", choices=["baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.side == "baseline":  # a fresh process per baseline run, so GPU memory is fully returned
        print(json.dumps(baseline(args.model, str(work / "shards"))))
        return
    import torch

    from omnilmm_ray.testing.tiny_vlm import QWEN2_VL_2B, build

    work.mkdir(parents=True, exist_ok=True)
    model = str(build(work / "Qwen2-VL-2B-shapes", shapes=QWEN2_VL_2B))
    make_shards(work / "shards", args.images)
    base_cmd = [sys.executable, __file__, "--side", "baseline", "--model", model, "--work", str(work)]

    def run_baseline():
        r = subprocess.run(base_cmd, capture_output=True, text=True, env=os.environ)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    import ray

    results = {"baseline_1": run_baseline()}
    ray.init(include_dashboard=False, log_to_driver=False)
    for variant in args.jobs.split(","):
        batch_size, concurrent = (int(x) for x in variant.split("x"))
        results[f"job_batch{batch_size}_x{concurrent}"] = job(
            model, str(work / "shards"), str(work / f"out-{time.time_ns()}"), batch_size, concurrent
        )
    ray.shutdown()
    results["baseline_2"] = run_baseline()
    for r in results.values():
        r["images_per_s"] = r["images"] / r["wall_s"]
    base = (results["baseline_1"]["images_per_s"] + results["baseline_2"]["images_per_s"]) / 2
    base_post_start = (
        sum(
            r["images"] / (r["decode_s"] + r["generate_s"])
            for k, r in results.items()
            if k.startswith("baseline")
        )
        / 2
    )
    lines = [
        f"# GPU throughput: lmdeploy alone vs. omnilmm-ray job ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `python bench/gpu_throughput.py --images {args.images} --jobs {args.jobs}`",
        f"GPU: {torch.cuda.get_device_name(0)}; CPU cores: {os.cpu_count()}; model: random weights, "
        "Qwen2-VL-2B shapes (tiny vocab); 640x480 JPEGs; TurboMind; greedy; max_new_tokens 32.",
        "",
        "| run | images | wall s | images/s | output tokens | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        notes = ", ".join(
            f"{k} {r[k]:.1f}" for k in ("engine_start_s", "decode_s", "generate_s", "pipeline_s") if k in r
        )
        lines.append(
            f"| {name} | {r['images']} | {r['wall_s']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['output_tokens']} | {notes} |"
        )
    lines += [
        "",
        "Ratios to the mean of both baselines:",
        "",
        "| job | end to end (all start-up included) | after start-up (baseline: decode+generate; job: Ray "
        "Data pipeline, which still includes the actor's engine start) |",
        "| --- | --- | --- |",
    ]
    for name, r in results.items():
        if name.startswith("job"):
            lines.append(
                f"| {name} | {r['images_per_s'] / base:.2f}x | "
                f"{r['images'] / r['pipeline_s'] / base_post_start:.2f}x |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
