"""Captioning throughput on 1 and 2 GPUs of one host: lmdeploy alone vs. this job, measured side by side.

Same JPEG shards (640x480, WebDataset tars on local disk), same random-weight model of Qwen2-VL-2B's shapes
(omnilmm_ray.testing.tiny_vlm.QWEN2_VL_2B), TurboMind, greedy, exactly `--tokens` new tokens per image.

- ceiling: one process per GPU, images decoded beforehand, a 512-image warm-up, then ONE `pipe(list)` call over
  all images (lmdeploy's best case); also the usual script end to end (engine start + decode + that call);
- two ceilings at once, one process per GPU (what two independent engines reach on one host);
- the seed loop: load 16 images, `pipe()` them, repeat;
- the job on 1 GPU, on 2 GPUs (2 actors), autoscaled (min 1, max 2 actors): end to end (process start to
  sealed output) and steady state (images of the shards committed between the 10th and 90th percentile of
  commit times, over that time);
- beside each: the GPUs' kernel-active share (nvidia-smi's sampled utilisation, not how busy the cores were).

    python bench/gpu_scale.py --part ceilings --out /tmp/scale-ceilings.json
    python bench/gpu_scale.py --part jobs --out /tmp/scale-jobs.json
    python bench/gpu_scale.py --part startup --out /tmp/scale-startup.json
    python bench/gpu_scale.py --report /tmp/scale-*.json > bench/results/gpu-scale.md

Per model family (each family's published small-model shapes, tiny_families.SHAPES), lmdeploy alone then the job:

    python bench/gpu_scale.py --part family --family qwen2_5_vl --images 8192 --out F-qwen2_5_vl.json
    python bench/gpu_scale.py --report-families F-*.json

GPU-bound regime (Qwen2-VL-7B shapes, 128 new tokens), and the job's batch size x engine calls in flight:

    python bench/gpu_scale.py --part family --shape 7b --tokens 128 --images 4096 --out F-7b.json
    # more cells on the same machine (each command stays within a time limit) against that one lmdeploy-alone call
    python bench/gpu_scale.py --part family --shape 7b --tokens 128 --images 4096 --ceiling-from F-7b.json \
        --job-cells 256x6 --out F-7b-more.json
    python bench/gpu_scale.py --part sweep --shape 7b --tokens 128 --cells 32x2,256x2 --out S.json
    python bench/gpu_scale.py --report-sweep S.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnilmm_ray.testing.tiny_vlm import QWEN2_VL_2B  # noqa: E402

PROMPT = "Describe this image in one detailed sentence."
# Random weights with published shapes (config.json of Qwen/Qwen2-VL-2B-Instruct and -7B-Instruct). The 7B keeps
# its whole vocabulary: its lm_head is ~7 % of each decoded token's weights, so a tiny one would flatter decoding.
SHAPES = {
    "2b": QWEN2_VL_2B,
    # the same model with its image processor capped at 224x224 (64 image tokens): the CPU-bound regime of the
    # first benchmarks, and the fastest real-shaped model for a long run
    "2b-224": {**QWEN2_VL_2B, "max_pixels": 224 * 224},
    "7b": {
        "text": dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
        ),
        "vision": dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=3584),
        "max_pixels": 448 * 448,
    },
}
PER_SHARD = 256


def _shard(args) -> str:
    from omnilmm_ray.samples import draw, encode, write_tar

    path, start, n = args
    samples = [
        # marked: every image distinct, as lmdeploy alone captions each one and the job captions a duplicate once
        (f"{i:07d}", {"jpg": encode(draw(i, size=(640, 480), mark=True)[0], quality=90)})
        for i in range(start, n)
    ]
    return str(write_tar(Path(path), samples))


def make_shards(root: Path, n: int, per_shard: int = PER_SHARD) -> Path:
    """A folder of exactly the first `n` images' tars (`per_shard` images each): `root` itself, or, where `root`
    holds more (built for a longer run), a folder of links to its first tars, so every run reads the images it
    names."""
    root.mkdir(parents=True, exist_ok=True)
    have = len(list(root.glob("*.tar")))
    if have * per_shard < n:
        jobs = [
            (root / f"{s // per_shard:05d}.tar", s, min(n, s + per_shard)) for s in range(0, n, per_shard)
        ]
        with ProcessPoolExecutor() as pool:
            list(pool.map(_shard, jobs))
        have = len(jobs)
    need = -(-n // per_shard)
    if have == need:
        return root
    view = root.parent / f"{root.name}-{n}"
    view.mkdir(exist_ok=True)
    for t in sorted(root.glob("*.tar"))[:need]:
        if not (view / t.name).exists():
            (view / t.name).symlink_to(t)
    return view


def iter_images(shards: Path):
    from PIL import Image

    for p in sorted(shards.glob("*.tar")):
        with tarfile.open(p) as tar:
            for m in tar:
                yield Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")


def machine() -> str:
    """The GPUs (nvidia-smi's names) and the CPU cores of this machine, in words."""
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.split("\n")
        gpus = [n for n in names if n.strip()]
    except FileNotFoundError:
        gpus = []
    return (f"{len(gpus)} x {gpus[0]}" if gpus else "no GPU") + f", {os.cpu_count()} CPU cores"


def _cpu_times() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all cores since boot."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return f[3] + f[4], sum(f)


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 200 ms: the share of samples in which a kernel was running; and
    the host's CPU busy share over the same time (/proc/stat), to see whether the CPU side is the limit."""

    def __init__(self):
        self.samples: list[tuple[float, list[int]]] = []  # (time.time(), one value per GPU)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.2):
            try:
                r = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                )
            except FileNotFoundError:  # no GPU here (the fake engine's runs): CPU share only
                return
            if r.returncode == 0:
                self.samples.append((time.time(), [int(x) for x in r.stdout.split()]))

    def __enter__(self):
        self._cpu0 = _cpu_times()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        idle, total = (b - a for a, b in zip(self._cpu0, _cpu_times()))
        self.cpu_busy_pct = round(100 * (1 - idle / max(total, 1)), 1)

    def mean(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Per GPU: the share of samples (taken between `start` and `end`, time.time()) with a kernel active."""
        window = [v for t, v in self.samples if start <= t <= end]
        if not window:
            return []
        return [round(sum(v[i] for v in window) / len(window), 1) for i in range(len(window[0]))]


def ceiling(
    model: str, shards: str, tokens: int, seed_loop: int, backend: str = "turbomind", chunk: int = 0
) -> dict:
    """One process, one GPU: the usual script end to end, then lmdeploy's steady rate on pre-decoded images;
    `chunk`: also the rate of `pipe()` over chunks of that many images, one call after another (for long prompts
    one call over every image can be slower than chunks: InternVL3-hf measured 6.5x below the job)."""
    import lmdeploy

    engine = {"turbomind": lmdeploy.TurbomindEngineConfig, "pytorch": lmdeploy.PytorchEngineConfig}[backend]
    t0 = time.perf_counter()
    pipe = lmdeploy.pipeline(
        model,
        backend_config=engine(session_len=2048, cache_max_entry_count=0.5),
        log_level="ERROR",
    )
    t_engine = time.perf_counter()
    images = list(iter_images(Path(shards)))
    t_decoded = time.perf_counter()
    gen = lmdeploy.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    pipe([(PROMPT, im) for im in images[:512]], gen_config=gen)  # warm-up of comparable size
    with GpuSampler() as gpu:
        t2 = time.perf_counter()
        out = pipe([(PROMPT, im) for im in images], gen_config=gen)
        t3 = time.perf_counter()
    res = {
        "images": len(out),
        "engine_start_s": t_engine - t0,
        "decode_s": t_decoded - t_engine,
        # the usual script = engine start + decode on one thread + the one call (its warm-up not counted)
        "script_end_to_end_images_per_s": len(out) / (t_decoded - t0 + t3 - t2),
        "ceiling_images_per_s": len(out) / (t3 - t2),
        "ceiling_gpu_util": gpu.mean(),
        "output_tokens": sum(r.generate_token_len for r in out),
        "input_tokens_per_image": sum(r.input_token_len for r in out) / len(out),
    }
    if chunk:
        with GpuSampler() as gpu:
            t4 = time.perf_counter()
            for i in range(0, len(images), chunk):
                pipe([(PROMPT, im) for im in images[i : i + chunk]], gen_config=gen)
            res[f"chunks_of_{chunk}_images_per_s"] = len(images) / (time.perf_counter() - t4)
            res[f"chunks_of_{chunk}_gpu_util"] = gpu.mean()
    if seed_loop:
        with GpuSampler() as gpu:
            t4 = time.perf_counter()
            n, chunk = 0, []
            for im in iter_images(Path(shards)):  # the seed's recipe: load 16 images, caption them, repeat
                chunk.append(im)
                if len(chunk) == 16:
                    pipe([(PROMPT, x) for x in chunk], gen_config=gen)
                    n, chunk = n + 16, []
                    if n >= seed_loop:
                        break
            res["seed_loop_images_per_s"] = n / (time.perf_counter() - t4)
            res["seed_loop_gpu_util"] = gpu.mean()
    pipe.close()
    return res


def run_ceilings(args, model: str, shards: Path) -> dict:
    cmd = [sys.executable, __file__, "--side", "ceiling", "--model", model, "--shards", str(shards)]
    cmd += ["--tokens", str(args.tokens)]

    def start(gpu: int, seed_loop: int = 0):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        return subprocess.Popen(
            [*cmd, "--seed-loop", str(seed_loop)], env=env, stdout=subprocess.PIPE, text=True
        )

    def result(p) -> dict:
        out, _ = p.communicate()
        assert p.returncode == 0, p.returncode
        return json.loads(out.strip().splitlines()[-1])

    res = {"ceiling_gpu0_alone": result(start(0, seed_loop=args.seed_loop))}
    pair = [start(0), start(1)]
    res["ceiling_two_at_once"] = [result(p) for p in pair]
    return res


def steady_window(commits: list[tuple[float, int]], calls: int) -> tuple[float, int, float, float]:
    """(images/s, commits counted, start, end) from the 10th percentile commit on, over whole rounds of `calls`
    commits, and short of the last round. `commits`: (time, rows), sorted.

    With `calls` engine calls in flight and a tar per call, tars commit from `calls` staggered streams, so a
    span that is not whole rounds counts a stagger too many or too few; and the last round of calls drains
    together (fewer sequences, faster steps), its commits bunched at the end. In a 16-tar run at 256 x 4 the
    plain 10th-90th percentile window read 84.5 images/s where whole rounds read 70.5."""
    lo = len(commits) // 10
    rounds = max(0, (min(len(commits) * 9 // 10, len(commits) - 1 - calls) - lo) // calls)
    hi = lo + rounds * calls if rounds else min(lo + 1, len(commits) - 1)  # too short for a round: one commit
    (start, _), (end, _) = commits[lo], commits[hi]
    if hi == lo:
        return float("nan"), 0, start, end
    window = commits[lo + 1 : hi + 1]
    return sum(c for _, c in window) / (end - start), len(window), start, end


def _commit_times(out: Path) -> list[tuple[float, int]]:
    import pyarrow.parquet as pq

    run = sorted(out.glob("run=*"))[-1]
    return sorted(
        (p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows)
        for p in run.glob("*.parquet")
        if ".part-" not in p.name
    )


_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})")
_READY = re.compile(r"engine actor ready in ([\d.]+)s \(backend \w+ resolved after ([\d.]+)s\)")
_RATE = re.compile(r"(?:pid=(\d+).*?)?engine actor: \d+ batches, \d+ images, ([\d.]+) images/s")
_FIRST = re.compile(
    r"first batch \((\d+) images\) arrived ([\d.]+)s after the actor was ready, done ([\d.]+)s"
)


def actor_rate(log: str) -> float | None:
    """The engine actors' own rate: the sum over actors of each one's last `engine actor: ... images/s` line
    (images since the actor was ready, over that time). Unlike the steady window it needs no many commits: a
    short run's few tars commit in bursts of `concurrent_batches`, and the window then measures their overlap."""
    last = {m[1]: float(m[2]) for m in _RATE.finditer(log)}
    return sum(last.values()) if last else None


def _stamp(line: str) -> float | None:
    """The time of a log line (its `YYYY-mm-dd HH:MM:SS,mmm` stamp, local time), or None."""
    m = _STAMP.search(line)
    if not m:
        return None
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000


def engine_life_rate(log: str, images: int) -> float | None:
    """`images` over the time from the first batch reaching an engine actor to the last commit, from the log's
    stamps. Unlike the steady window (which needs many commits: a short run's tars commit in bursts of
    `concurrent_batches`) and the actor's own line (logged every 15 s, counting finished calls only), it holds
    the whole run after start-up, the first batch's latency and the last commit included: a lower bound."""
    t = timeline(log, 0.0)
    commits = [_stamp(ln) for ln in log.splitlines() if "committed shard" in ln or "committed part" in ln]
    commits = [c for c in commits if c is not None]
    if "first_batch_in" not in t or not commits:
        return None
    return images / (max(commits) - t["first_batch_in"])


def timeline(log: str, t0: float) -> dict:
    """Seconds after the job's process started at which the start-up steps happened, from the log's stamps
    (the driver's and the first engine actor's lines; one host, one clock)."""

    def at(line: str) -> float | None:
        t = _stamp(line)
        return None if t is None else t - t0

    steps: dict[str, float] = {}
    for ln in log.splitlines():
        t = at(ln)
        if t is None:
            continue
        if "omnilmm_ray.job: run " in ln:
            steps.setdefault("planned", t)
        elif "lmdeploy imported in" in ln:
            steps.setdefault("lmdeploy_imported", t)
        elif "Starting execution of Dataset" in ln:
            steps.setdefault("pipeline_started", t)
        elif (m := _READY.search(ln)) and "actor_ready" not in steps:
            ready_in, resolved = float(m.group(1)), float(m.group(2))
            steps.update(actor_started=t - ready_in, gate_opened=t - ready_in + resolved, actor_ready=t)
        elif (m := _FIRST.search(ln)) and "first_batch_done" not in steps:
            steps["first_batch_in"] = steps.get("actor_ready", t) + float(m.group(2))
            steps["first_batch_done"] = steps["first_batch_in"] + float(m.group(3))
        elif "committed shard" in ln or "committed part" in ln:
            steps.setdefault("first_commit_logged", t)
    return {k: round(v, 2) for k, v in sorted(steps.items(), key=lambda kv: kv[1])}


def job(
    model: str,
    shards: Path,
    out: Path,
    tokens: int,
    gpus: int,
    min_actors: int,
    batch: int,
    ray_address: str = "local",
    extra: dict | None = None,
    backend: str = "turbomind",
) -> dict:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from omnilmm_ray.config import ScaleConfig, merged

    cfg = {
        "engine": {"backend": backend, "model": model, "session_len": 2048, "cache_max_entry_count": 0.5},
        "generation": {"max_new_tokens": tokens, "min_new_tokens": tokens},
        "scale": {"batch_size": batch, "min_actors": min_actors, "max_actors": gpus},
        "preprocess": {"max_side": 640},  # = the image size: the engine sees the same pixels as the ceiling
    }
    cfg = merged(cfg, extra or {})
    cfg_path = out.with_suffix(".yaml")
    cfg_path.write_text(json.dumps(cfg))
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus)),
        "RAY_ADDRESS": ray_address,
    }
    cmd = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--config", str(cfg_path)]
    cmd += ["--input", str(shards), "--output", str(out)]
    with GpuSampler() as gpu:
        t0 = time.time()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        t1 = time.time()
    (out.parent / f"{out.name}.log").write_text(r.stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    run = sorted(out.glob("run=*"))[-1]
    rows = pads.dataset(str(run), format="parquet").to_table(columns=["error", "output_tokens", "cached"])
    commits = _commit_times(out)
    n = sum(c for _, c in commits)
    calls = cfg["scale"].get("concurrent_batches", ScaleConfig().concurrent_batches)
    steady, window, start, end = steady_window(commits, calls)
    actor_lines = [ln.split("engine actor: ", 1)[1] for ln in r.stderr.splitlines() if "engine actor: " in ln]
    started = [
        ln.split("engine actor ready", 1)[1] for ln in r.stderr.splitlines() if "engine actor ready" in ln
    ]
    return {
        "images": n,
        "end_to_end_images_per_s": n / (t1 - t0),
        "steady_images_per_s": steady,
        "steady_commits": window,
        "actor_images_per_s": actor_rate(r.stderr),
        "life_images_per_s": engine_life_rate(r.stderr, n),
        "first_commit_s": commits[0][0] - t0,
        "wall_s": t1 - t0,
        "gpu_util": gpu.mean(),
        "gpu_util_steady": gpu.mean(start, end),  # over the steady window only
        "cpu_busy_pct": gpu.cpu_busy_pct,
        "actor_timings_last": actor_lines[-2:],
        "actor_start": started,
        "timeline_s": timeline(r.stderr, t0),
        "config": cfg,
        "error_rows": rows.num_rows - rows.column("error").null_count,
        "output_tokens": pc.sum(rows.column("output_tokens")).as_py(),
        # rows captioned without the engine (an in-run duplicate, or reuse): lmdeploy alone captions every image,
        # so any here makes the job's side of a ratio flattering (make_shards' images are all distinct)
        "served_without_engine": pc.sum(rows.column("cached")).as_py() or 0,
    }


def run_jobs(args, model: str, shards: Path) -> dict:
    work = Path(args.work)
    res = {}
    extra = json.loads(args.job_config) if args.job_config else None
    for name, gpus, min_actors in (("job_1gpu", 1, 1), ("job_2gpu", 2, 2), ("job_autoscale_1to2", 2, 1)):
        if args.jobs and name not in args.jobs:
            continue
        out = work / f"out-{name}-{time.time_ns()}"
        res[name] = job(model, shards, out, args.tokens, gpus, min_actors, args.batch, extra=extra)
    return res


def run_startup(args, model: str, shards: Path) -> dict:
    """Start-up on a warm local Ray (`ray start --head` before the job, as on a cluster): first commit."""
    work = Path(args.work)
    few = work / "startup-shards"
    few.mkdir(parents=True, exist_ok=True)
    for t in sorted(shards.glob("*.tar"))[:8]:
        if not (few / t.name).exists():
            (few / t.name).symlink_to(t)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run(
        [*ray_cli, "start", "--head", "--num-gpus", "1", "--disable-usage-stats"], env=env, check=True
    )
    extra = json.loads(args.job_config) if args.job_config else None
    try:
        res = {}
        for i in range(args.repeat):
            out = work / f"out-startup-{time.time_ns()}"
            name = "job_1gpu_warm_ray" + (f"_{i + 1}" if i else "")
            res[name] = job(model, few, out, args.tokens, 1, 1, args.batch, ray_address="auto", extra=extra)
        return res
    finally:
        subprocess.run([*ray_cli, "stop", "--force"], env=env)


def run_family(args, model: str, shards: Path) -> dict:
    """One family at its small model's shapes: lmdeploy alone (one process, one call) then the job, one GPU."""
    from omnilmm_ray.config import merged

    if args.ceiling_from:
        res = {"ceiling": earlier_ceiling(args.ceiling_from, args.family, args.meta)}
    else:
        cmd = [sys.executable, __file__, "--side", "ceiling", "--model", model, "--shards", str(shards)]
        cmd += ["--tokens", str(args.tokens), "--seed-loop", "0", "--backend", args.backend]
        cmd += ["--ceiling-chunk", str(args.ceiling_chunk)]
        r = subprocess.run(
            cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"}, stdout=subprocess.PIPE, text=True
        )
        assert r.returncode == 0, r.returncode
        res = {"ceiling": json.loads(r.stdout.strip().splitlines()[-1])}
    print("ceiling", json.dumps(res["ceiling"]), file=sys.stderr, flush=True)
    # what is measured survives a failed or timed-out job
    Path(args.out).write_text(json.dumps({args.family: res, "meta": args.meta}, indent=1))
    extra = json.loads(args.job_config) if args.job_config else {}
    # `--job-cells 256x2,256x4`: one job per cell against the one ceiling; the first is `job_1gpu`
    for i, cell in enumerate(args.job_cells.split(",") if args.job_cells else [None]):
        scale = sweep_cell(cell) if cell else {"batch_size": args.batch}
        name = "job_1gpu" if i == 0 else f"job_1gpu_{cell}"
        out = Path(args.work) / f"out-{args.family}-{time.time_ns()}"
        res[name] = job(
            model,
            shards,
            out,
            args.tokens,
            1,
            1,
            scale["batch_size"],
            extra=merged(extra, {"scale": scale}),
            backend=args.backend,
        )
        res[name]["cell"] = cell
        print(name, json.dumps({k: res[name][k] for k in SWEEP_KEYS}), file=sys.stderr, flush=True)
        Path(args.out).write_text(json.dumps({args.family: res, "meta": args.meta}, indent=1))
    return {args.family: res}


# What must match for a ceiling measured by an earlier run to stand beside this run's jobs.
SAME_RUN = ("gpu", "images", "tokens", "shape", "lmdeploy")


def earlier_ceiling(path: str, family: str, meta: dict) -> dict:
    """lmdeploy alone as an earlier `--part family` run on this machine measured it (`--ceiling-from`), so more
    job cells need not measure it again: refused unless it ran the same model, images and caption length on the
    same GPU kind, this day. The machine itself cannot be checked from here: use it only on the machine that
    wrote it, while that machine is still up."""
    earlier = json.loads(Path(path).read_text())
    differ = [k for k in (*SAME_RUN, "date") if earlier["meta"].get(k) != meta.get(k)]
    if differ or family not in earlier:
        raise SystemExit(
            f"--ceiling-from {path}: not comparable with this run ("
            + (
                ", ".join(f"{k} {earlier['meta'].get(k)!r} vs {meta.get(k)!r}" for k in differ)
                or f"no {family}"
            )
            + "); measure lmdeploy alone again"
        )
    return {**earlier[family]["ceiling"], "from": path}


SWEEP_KEYS = (
    "life_images_per_s",
    "steady_images_per_s",
    "steady_commits",
    "actor_images_per_s",
    "gpu_util_steady",
    "images",
    "error_rows",
    "served_without_engine",
)


def sweep_cell(cell: str) -> dict:
    """A sweep cell as the job's `scale` settings: "256x2" is batch_size 256, concurrent_batches 2; further
    settings follow as ":name=JSON value", e.g. "256x2:max_batches_in_flight=8"."""
    size, *overrides = cell.split(":")
    batch, calls = (int(x) for x in size.split("x"))
    scale = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in overrides)}
    return {**scale, "batch_size": batch, "concurrent_batches": calls}


def run_sweep(args, model: str, shards: Path) -> dict:
    """Batch size x engine calls in flight (`--cells 32x1,256x2,...`): the job's steady rate per cell, on one warm
    local Ray (started once, as on a cluster), one GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run(
        [*ray_cli, "start", "--head", "--num-gpus", "1", "--disable-usage-stats"], env=env, check=True
    )
    res: dict = {}
    try:
        for cell in args.cells.split(","):
            scale = sweep_cell(cell)
            batch = scale["batch_size"]
            out = Path(args.work) / f"out-sweep-{batch}x{scale['concurrent_batches']}-{time.time_ns()}"
            extra = {"scale": scale}
            j = job(model, shards, out, args.tokens, 1, 1, batch, "auto", extra, args.backend)
            res[cell] = {k: j[k] for k in SWEEP_KEYS}
            print(cell, json.dumps(res[cell]), file=sys.stderr, flush=True)
            # what is done survives a time-out
            Path(args.out).write_text(json.dumps({"sweep": res, "meta": args.meta}, indent=1))
    finally:
        subprocess.run([*ray_cli, "stop", "--force"], env=env)
    return {"sweep": res}


def _rate(j: dict) -> float:
    """A job's rate for ratios: first batch in to last commit where the log gave it, else the steady window."""
    return j.get("life_images_per_s") or j["steady_images_per_s"]


def report_sweep(path: str) -> str:
    r = json.loads(Path(path).read_text())
    meta, cells = r["meta"], r["sweep"]
    best = max(_rate(c) for c in cells.values())
    lines = [
        f"Batch size x engine calls in flight, the job on 1 x {meta['gpu']} ({meta['shape']} shapes, "
        f"{meta['tokens']} tokens, {meta['images']} images; `{meta['command']}`):",
        "",
        "| batch_size | concurrent_batches | images/s, first batch in to last commit | of best | "
        "steady window images/s (commits) | engine actor's own rate (images/s) | GPU kernel-active % (steady) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell, c in cells.items():
        scale = sweep_cell(cell)
        b, k = scale.pop("batch_size"), scale.pop("concurrent_batches")
        lines.append(
            f"| {b} | {k}{''.join(f' {n}={v}' for n, v in scale.items())} | {_fmt(c.get('life_images_per_s'))} | {_rate(c) / best:.2f} | "
            f"{c['steady_images_per_s']:.1f} ({c.get('steady_commits', '?')}) | "
            f"{_fmt(c.get('actor_images_per_s'))} | {c['gpu_util_steady']} |"
        )
    return "\n".join(lines)


def _served(j: dict) -> str:
    """Rows the job served without its engine, where the run counted them: any makes its ratio flattering."""
    n = j.get("served_without_engine")
    return "" if n is None else f", {n} served without the engine" + (" (**ratio flattered**)" if n else "")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def report_families(paths: list[str]) -> str:
    """One table over `--part family` results (one file per family, all from one machine); a row per job."""
    rows, meta = [], None
    for p in paths:
        r = json.loads(Path(p).read_text())
        meta = r.pop("meta")
        for fam, res in r.items():
            rows += [_family_row(fam, res, j) for k, j in res.items() if k.startswith("job_1gpu")]
    return "\n".join(
        [
            f"# Speed per model family, lmdeploy alone vs. the job, one GPU ({meta['date']})",
            "",
            f"Machine: {meta['gpus']} x {meta['gpu']}, {meta['cpus']} CPU cores; lmdeploy {meta['lmdeploy']}, "
            f"ray {meta['ray']}, torch {meta['torch']}. {meta['images']} JPEGs 640x480 in WebDataset tars; greedy; "
            f"exactly {meta['tokens']} new tokens; job batch {meta['batch']} unless the row names its batch size x "
            "engine calls in flight. Random weights with each family's published small-model shapes "
            "(omnilmm_ray/testing/tiny_families.py SHAPES).",
            f"Command per family: `{meta['command']}`; table: `python bench/gpu_scale.py --report-families F*.json`",
            "",
            "| family | backend | shapes | lmdeploy alone (images/s: one call / in chunks) | job, first batch in to "
            "last commit (images/s; / lmdeploy's best) | job steady window (images/s) | steady / lmdeploy's best | "
            "job's engine actors, own rate (images/s) | "
            "job end to end (images/s) | GPU kernel-active % (alone's call / job's steady window) | images |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )


def _family_row(fam: str, res: dict, j: dict) -> str:
    c = res["ceiling"]
    chunked = [v for k, v in c.items() if k.startswith("chunks_of_") and k.endswith("_images_per_s")]
    alone = max([c["ceiling_images_per_s"], *chunked])  # lmdeploy's best: one call or chunks
    life = j.get("life_images_per_s")
    return (
        f"| {fam}{f' ({cell})' if (cell := j.get('cell')) else ''} | {res.get('backend', 'turbomind')} | "
        f"{res.get('shape', '')} | {c['ceiling_images_per_s']:.1f}"
        + "".join(f" / {x:.1f}" for x in chunked)
        + (f" (measured by {Path(c['from']).name})" if c.get("from") else "")
        + f" | {_fmt(life)}"
        + (f" (**{life / alone:.2f}x**)" if life else "")
        + f" | {j['steady_images_per_s']:.1f} ({j.get('steady_commits', '?')} commits) | "
        f"{j['steady_images_per_s'] / alone:.2f}x | {_fmt(j.get('actor_images_per_s'))} | "
        f"{j['end_to_end_images_per_s']:.1f} | {c['ceiling_gpu_util']} / {j.get('gpu_util_steady', j['gpu_util'])} | "
        f"{j['images']} ({j['error_rows']} errors{_served(j)}) |"
    )


def model_folder(
    work: Path, family: str = "qwen2_vl", shape: str = "2b", awq: bool = False
) -> tuple[Path, str]:
    """(the random-weight model's folder under `work`, built there once, and the backend lmdeploy picks for it):
    Qwen2-VL at `shape` (SHAPES), optionally with its language model in AWQ int4, or another family at its
    published small model's shapes (tiny_families.SHAPES)."""
    from omnilmm_ray.testing import tiny_families
    from omnilmm_ray.testing.tiny_vlm import build

    if family != "qwen2_vl":
        folder = work / f"{family}-small-shapes"
        if not (folder / "config.json").exists():
            tiny_families.build(family, folder, shapes=tiny_families.SHAPES[family])
        return folder, tiny_families.BUILDERS[family].backend
    folder = work / f"Qwen2-VL-{shape.upper()}-shapes{'-AWQ' if awq else ''}"
    if not (folder / "config.json").exists():
        build(folder, dtype="float16" if awq else "bfloat16", shapes=SHAPES[shape])
        if awq:  # int4 round-to-nearest in AWQ's layout: the speed of a real AWQ model, not its quality
            from omnilmm_ray.testing.tiny_awq import quantize_folder

            quantize_folder(folder)
    return folder, "turbomind"


def report(paths: list[str]) -> str:
    r: dict = {}
    for p in paths:
        r.update(json.loads(Path(p).read_text()))
    meta = r.pop("meta")
    c1 = r["ceiling_gpu0_alone"]
    pair = r["ceiling_two_at_once"]
    ceil = c1["ceiling_images_per_s"]
    pair_rates = [p["ceiling_images_per_s"] for p in pair]
    pair_sum = sum(pair_rates)
    lines = [
        f"# GPU scale: lmdeploy alone vs. the job on 1 and 2 GPUs ({meta['date']})",
        "",
        f"Machine: {meta['gpus']} x {meta['gpu']}, {meta['cpus']} CPU cores; lmdeploy {meta['lmdeploy']}, "
        f"ray {meta['ray']}, torch {meta['torch']}. Model: random weights, Qwen2-VL-2B shapes; {meta['images']} "
        f"JPEGs 640x480 in {meta['images'] // PER_SHARD} WebDataset tars; TurboMind; greedy; exactly "
        f"{meta['tokens']} new tokens; job batch {meta['batch']}.",
        f"Commands: {meta['commands']}",
        "",
        "| what | images/s | ratio | GPU kernel-active % |",
        "| --- | --- | --- | --- |",
        f"| lmdeploy alone, one call over pre-decoded images (ceiling, GPU 0) | {ceil:.1f} | 1.00x ceiling | "
        f"{c1['ceiling_gpu_util']} |",
        f"| the usual script end to end (engine start + decode + one call) | "
        f"{c1['script_end_to_end_images_per_s']:.1f} | {c1['script_end_to_end_images_per_s'] / ceil:.2f}x | |",
        f"| the seed loop (load 16, caption, repeat) | {c1['seed_loop_images_per_s']:.1f} | "
        f"{c1['seed_loop_images_per_s'] / ceil:.2f}x | {c1['seed_loop_gpu_util']} |",
        f"| two lmdeploy processes at once, one per GPU | {pair_sum:.1f} "
        f"({' + '.join(f'{x:.1f}' for x in pair_rates)}) | {pair_sum / ceil:.2f}x one | "
        f"{pair[0]['ceiling_gpu_util']} |",
    ]
    jobs = [n for n in ("job_1gpu", "job_2gpu", "job_autoscale_1to2") if n in r]  # --jobs may run a subset
    j1 = r["job_1gpu"]["steady_images_per_s"] if "job_1gpu" in r else None
    for name in jobs:
        j = r[name]
        gpus = 1 if name == "job_1gpu" else 2
        lines.append(
            f"| {name}: steady | {j['steady_images_per_s']:.1f} | "
            f"{j['steady_images_per_s'] / (gpus * ceil):.2f}x of {gpus} x ceiling"
            + (f", {j['steady_images_per_s'] / j1:.2f}x job_1gpu" if gpus == 2 and j1 else "")
            + f" | {j['gpu_util']} |"
        )
        lines.append(
            f"| {name}: end to end ({j['images']} images, {j['error_rows']} error rows{_served(j)}, "
            f"{j['output_tokens']} output tokens, first commit at {j['first_commit_s']:.1f} s) | "
            f"{j['end_to_end_images_per_s']:.1f} | {j['end_to_end_images_per_s'] / (gpus * ceil):.2f}x of "
            f"{gpus} x ceiling | |"
        )
    warm = sorted(k for k in r if k.startswith("job_1gpu_warm_ray"))
    if warm:
        lines += [
            "",
            f"Start-up on a warm local Ray (`ray start --head`, then the job; {r[warm[0]]['images']} images), "
            "seconds after the job's process started:",
            "",
            "| run | first commit | end to end | timeline (s) |",
            "| --- | --- | --- | --- |",
        ]
        for k in warm:
            w = r[k]
            steps = ", ".join(f"{step} {t}" for step, t in w.get("timeline_s", {}).items())
            lines.append(f"| {k} | {w['first_commit_s']:.1f} | {w['wall_s']:.1f} | {steps} |")
    lines += ["", "Host CPU busy share over each job (/proc/stat):", ""]
    for name in jobs:
        if "cpu_busy_pct" in r[name]:
            lines.append(f"- {name}: {r[name]['cpu_busy_pct']} %")
    lines += ["", "Engine actor start (log lines of each job):", ""]
    for name in ("job_1gpu", "job_2gpu", "job_autoscale_1to2", *warm):
        for ln in r.get(name, {}).get("actor_start", []):
            lines.append(f"- {name}: engine actor ready{ln}")
    lines += ["", "Engine actor timings (last log lines of each job):", ""]
    for name in jobs:
        for ln in r[name]["actor_timings_last"]:
            lines.append(f"- {name}: {ln.split(chr(27))[0]}")
    lines += ["", "Raw results:", "", "```json", json.dumps(r, indent=1), "```"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20480)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed-loop", type=int, default=2048, help="images for the seed-loop measurement")
    ap.add_argument("--work", default="/tmp/omnilmm-bench")
    ap.add_argument("--part", choices=["ceilings", "jobs", "startup", "family", "sweep"])
    ap.add_argument("--out")
    ap.add_argument(
        "--jobs", nargs="+", help="--part jobs: only these (job_1gpu job_2gpu job_autoscale_1to2)"
    )
    ap.add_argument("--job-config", help="JSON merged into every job's config, e.g. '{\"scale\": {...}}'")
    ap.add_argument("--repeat", type=int, default=1, help="--part startup: how many warm-Ray jobs")
    ap.add_argument("--report", nargs="+")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="2b", help="the model's published shapes")
    ap.add_argument(
        "--family",
        default="qwen2_vl",
        help="--part family: qwen2_vl or a name in omnilmm_ray/testing/tiny_families.py SHAPES",
    )
    ap.add_argument("--report-families", nargs="+")
    ap.add_argument(
        "--ceiling-chunk", type=int, default=512, help="--part family: lmdeploy alone in chunks too"
    )
    ap.add_argument(
        "--ceiling-from",
        help="--part family: lmdeploy alone from this earlier --out of the same machine, model and images",
    )
    ap.add_argument("--awq", action="store_true", help="qwen2_vl: the language model's linears in AWQ int4")
    ap.add_argument(
        "--cells",
        default=",".join(f"{b}x{k}" for b in (32, 64, 128, 256) for k in (1, 2, 4)),
        help="--part sweep: batch_size x concurrent_batches, each optionally with scale overrides, e.g. "
        "256x2:max_batches_in_flight=8",
    )
    ap.add_argument(
        "--job-cells", help="--part family: one job per cell (as --cells) after the one lmdeploy-alone call"
    )
    ap.add_argument("--report-sweep")
    ap.add_argument("--side", choices=["ceiling"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="turbomind", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.report_families:
        print(report_families(args.report_families))
        return
    if args.report_sweep:
        print(report_sweep(args.report_sweep))
        return
    work = Path(args.work)
    if args.side == "ceiling":
        c = ceiling(args.model, args.shards, args.tokens, args.seed_loop, args.backend, args.ceiling_chunk)
        print(json.dumps(c))
        return
    import lmdeploy
    import ray
    import torch

    model_dir, args.backend = model_folder(work, args.family, args.shape, args.awq)
    model = str(model_dir)
    shards = make_shards(work / "shards", args.images)
    parts = {"ceilings": run_ceilings, "jobs": run_jobs, "startup": run_startup, "family": run_family}
    part = {**parts, "sweep": run_sweep}[args.part]
    args.meta = {  # before the part runs: a sweep cut short by a time-out still names its machine
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "cpus": os.cpu_count(),
        "lmdeploy": lmdeploy.__version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "images": args.images,
        "tokens": args.tokens,
        "batch": args.batch,
        "shape": (
            f"Qwen2-VL-{args.shape.upper()}{' AWQ int4' if args.awq else ''}"
            if args.family == "qwen2_vl"
            else f"{args.family} small"
        ),
        "commands": "`python bench/gpu_scale.py --part ceilings --out C.json`, `... --part jobs --out J.json`, "
        "`... --part startup --out S.json`, `... --report C.json J.json S.json`",
        "command": " ".join(["python bench/gpu_scale.py", *sys.argv[1:]]),
    }
    res = part(args, model, shards)
    if args.part == "family":
        params = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2e9  # bf16 bytes -> params
        res[args.family].update(backend=args.backend, shape=f"~{params:.1f} B params")
    res["meta"] = args.meta
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
