"""A long run on one GPU: does the job keep its rate and its memory from the first shards to the last?

Runs the job once over `--images` 640x480 JPEGs (WebDataset tars of 256, built once under --work) with a
progress line every 10 s, then reads back
- the rate per tenth of the run: images of the shards committed in each tenth (by commit order) over that
  tenth's time; the first tenth holds the start-up, the last one the drain, so compare tenths 2 and 9 (and
  10), as the "last 10 % within 5 % of the first steady 10 %" goal asks;
- from the progress lines: the driver's resident memory, the object store's use and the bytes spilled, first /
  largest / last.

    python bench/long_run.py --images 200000 --out L.json               # Qwen2-VL-2B shapes, TurboMind
    python bench/long_run.py --images 200000 --shape 2b-224 --out L.json # the same, images capped at 224 px
    python bench/long_run.py --images 20000 --engine fake --out L.json   # the CPU side alone (no GPU)
    python bench/long_run.py --report L.json

Same shards, model and job settings as bench/gpu_scale.py (it is imported from there).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_scale  # noqa: E402

_PROGRESS = re.compile(
    r"(?P<when>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ .*progress: (?P<images>[\d,]+)/\S+ images.*?"
    r", memory: driver (?P<driver>[\d.]+) (?P<driver_unit>KB|MB|GB)"
    r"(?: \((?P<private>[\d.]+) (?P<unit>KB|MB|GB) private\))?"
    r"(?:, object store (?P<store>[\d.]+)/(?P<cap>[\d.]+) GB, spilled (?P<spilled>[\d.]+) (?P<spilled_unit>B|KB|MB|GB))?"
)
_UNIT = {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}


def tenths(commits: list[tuple[float, int]]) -> list[float]:
    """Images per second over each tenth of the commits (in commit order)."""
    n = len(commits)
    marks = [commits[min(n - 1, round(k * n / 10))] for k in range(11)]
    rates = []
    for k in range(10):
        lo, hi = round(k * n / 10), round((k + 1) * n / 10)
        t0, t1 = marks[k][0], commits[hi - 1][0]
        images = sum(c for _, c in commits[lo + (k > 0) : hi])  # the first commit of a tenth opens its clock
        rates.append(images / (t1 - t0) if t1 > t0 else float("nan"))
    return rates


def memory_series(log: str) -> list[dict]:
    out = []
    for m in _PROGRESS.finditer(log):
        t = time.mktime(time.strptime(m["when"], "%Y-%m-%d %H:%M:%S"))
        row = {
            "t": t,
            "images": int(m["images"].replace(",", "")),
            "driver_mb": float(m["driver"]) * _UNIT[m["driver_unit"]],
        }
        if m["private"]:
            row.update(driver_private_mb=float(m["private"]) * _UNIT[m["unit"]])
        if m["store"]:
            row.update(
                store_gb=float(m["store"]),
                store_cap_gb=float(m["cap"]),
                spilled_mb=float(m["spilled"]) * _UNIT[m["spilled_unit"]],
            )
        out.append(row)
    return out


def report(path: str) -> str:
    r = json.loads(Path(path).read_text())
    rates, mem, meta = r["tenths_images_per_s"], r["memory"], r["meta"]
    steady = rates[1]
    lines = [
        f"# Long run, {meta['images']:,} images, engine {meta.get('engine', 'turbomind')} ({meta['date']}, "
        f"{meta['machine']})",
        "",
        f"Command: `{meta['command']}`; job: {r['job']['images']:,} images, {r['job']['error_rows']} error rows"
        f"{gpu_scale._served(r['job'])}, "
        f"{r['job']['wall_s']:.0f} s end to end, steady {r['job']['steady_images_per_s']:.1f} images/s.",
        "",
        "| tenth of the run | " + " | ".join(str(k + 1) for k in range(10)) + " |",
        "| --- |" + " --- |" * 10,
        "| images/s | " + " | ".join(f"{x:.1f}" for x in rates) + " |",
        "| of tenth 2 | " + " | ".join(f"{x / steady:.3f}" for x in rates) + " |",
        "",
    ]
    for key, what in (
        ("driver_mb", "driver RSS (MB)"),
        ("driver_private_mb", "driver private memory (MB)"),
        ("store_gb", "object store used (GB)"),
        ("spilled_mb", "spilled (MB)"),
    ):
        vals = [m[key] for m in mem if key in m]
        if vals:
            lines.append(
                f"- {what}: first {vals[0]:.1f}, largest {max(vals):.1f}, last {vals[-1]:.1f} "
                f"({len(vals)} progress lines)"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument(
        "--shape", choices=sorted(gpu_scale.SHAPES), default="2b", help="the model's published shapes"
    )
    ap.add_argument("--engine", choices=["turbomind", "fake"], default="turbomind")
    ap.add_argument("--work", default="/tmp/omnilmm-bench")
    ap.add_argument("--out")
    ap.add_argument("--report")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    work = Path(args.work)
    shards = gpu_scale.make_shards(work / f"shards-{args.images}", args.images)
    model = "fake" if args.engine == "fake" else str(gpu_scale.model_folder(work, shape=args.shape)[0])
    out = work / f"out-long-{time.time_ns()}"
    extra = {"report": {"progress_s": 10}}
    res = gpu_scale.job(model, shards, out, args.tokens, 1, 1, args.batch, extra=extra, backend=args.engine)
    log = (out.parent / f"{out.name}.log").read_text()
    res = {
        "job": {k: v for k, v in res.items() if k != "config"},
        "tenths_images_per_s": tenths(gpu_scale._commit_times(out)),
        "memory": memory_series(log),
        "meta": {
            "date": time.strftime("%Y-%m-%d"),
            "images": args.images,
            "engine": args.engine,
            "shape": args.shape,
            "machine": gpu_scale.machine(),
            "command": " ".join(["python bench/long_run.py", *sys.argv[1:]]),
        },
    }
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(report(args.out))


if __name__ == "__main__":
    main()
