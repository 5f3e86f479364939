"""How full the job keeps a continuous-batching engine behind lmdeploy's pipeline: engine calls in flight x caption
length, against one call over every image (the fake engine's model of it; CPU only, no GPU).

The fake engine's Decoder (omnilmm_ray/engines/fake.py) takes time as lmdeploy 0.18's `pipeline` over TurboMind
does (`Pipeline._infer`): up to `--slots` captions decode at once, admitted first come first served across the
actor's calls, each gaining a token per `--step` seconds, and a call returns when its longest caption is done.
Captions of one fixed length, and of lengths spread over a range (as real captions are), each at the given
`batch_size x concurrent_batches` cells. "lmdeploy alone" is the same Decoder given every caption of the job's
output, their lengths as the job drew them, in one call (its steps counted, times `--step`). The job's rate is from its first batch
in to its last commit; the job's CPU side must outrun the engine (`--step` large enough) for the ratio to be the
engine's fill. A model of the engine's admission, prefill left out: it says how the job feeds such an engine, not
how fast any real engine is.

    python bench/engine_fill.py --out F.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_scale  # noqa: E402

from omnilmm_ray.engines.fake import Decoder  # noqa: E402


def lengths_of(out: Path) -> list[int]:
    import pyarrow.dataset as pads

    run = sorted(out.glob("run=*"))[-1]
    table = pads.dataset(str(run), format="parquet").to_table(columns=["output_tokens"])
    return table.column("output_tokens").to_pylist()


def alone(lengths: list[int], slots: int, step: float) -> float:
    """One call over every caption: the Decoder's steps for it, without sleeping, times `step` (what it would
    sleep; the job's side also pays each step's few microseconds of overhead, so this leans to the one call)."""
    d = Decoder(slots, 0)
    d.decode(lengths)
    return len(lengths) / (d.steps * step)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--slots", type=int, default=1024, help="captions the engine decodes at once")
    ap.add_argument("--step", type=float, default=0.4, help="seconds per decoding step")
    ap.add_argument("--lengths", default="32-32,16-48", help="caption length ranges in tokens, lo-hi")
    ap.add_argument("--cells", default="256x4,256x5,256x6")
    ap.add_argument("--work", default="/tmp/omnilmm-engine-fill")
    ap.add_argument("--out")
    ap.add_argument("--report")
    args = ap.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    work = Path(args.work)
    shards = gpu_scale.make_shards(work / "shards", args.images)
    res: dict = {
        "meta": {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join(["python bench/engine_fill.py", *sys.argv[1:]]),
            "images": args.images,
            "slots": args.slots,
            "step_s": args.step,
        },
        "runs": [],
    }
    for span in args.lengths.split(","):
        lo, hi = (int(x) for x in span.split("-"))
        for cell in args.cells.split(","):
            scale = gpu_scale.sweep_cell(cell)
            engine = {
                "max_batch_size": args.slots,
                "fake_decode_step_s": args.step,
                "fake_caption_tokens": [lo, hi],
            }
            out = work / f"out-{span}-{cell}-{time.time_ns()}"
            j = gpu_scale.job(
                "fake",
                shards,
                out,
                32,
                1,
                1,
                scale["batch_size"],
                extra={"engine": engine, "scale": scale},
                backend="fake",
            )
            lengths = lengths_of(out)
            run = {
                "lengths": span,
                "cell": cell,
                "images": j["images"],
                "error_rows": j["error_rows"],
                "job_images_per_s": j["life_images_per_s"],
                "alone_images_per_s": alone(lengths, args.slots, args.step),
                "mean_tokens": sum(lengths) / len(lengths),
            }
            run["ratio"] = run["job_images_per_s"] / run["alone_images_per_s"]
            res["runs"].append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(res, indent=1))
    print(report(res))


def report(res: dict) -> str:
    m = res["meta"]
    lines = [
        f"Fake engine modelled on lmdeploy 0.18's pipeline: {m['slots']} slots, {m['step_s']} s per step, "
        f"{m['images']} images; {m['machine']}; {m['date']}. Command: `{m['command']}`",
        "",
        "| caption tokens | batch_size x concurrent_batches | job images/s (first batch in to last commit) | "
        "one call over every caption, images/s | job / one call | images (errors) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['lengths']} (mean {r['mean_tokens']:.1f}) | {r['cell']} | {r['job_images_per_s']:.1f} | "
            f"{r['alone_images_per_s']:.1f} | **{r['ratio']:.2f}x** | {r['images']} ({r['error_rows']}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
