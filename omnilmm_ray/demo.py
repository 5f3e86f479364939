"""`make demo`: build sample shards, caption them on local Ray, print a few captions and the summary.

Uses lmdeploy TurboMind with the default model when a CUDA GPU and lmdeploy are present, else the fake
engine (loudly labelled: its captions are placeholders).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.dataset as pads

from omnilmm_ray import cli
from omnilmm_ray.samples import build_samples


def gpu_available() -> bool:
    if importlib.util.find_spec("lmdeploy") is None or shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def main(root: str = "samples", output: str = "out/demo") -> int:
    build_samples(root, shards=4, per_shard=32)
    shutil.rmtree(output, ignore_errors=True)
    engine = "turbomind" if gpu_available() else "fake"
    args = [
        "--input",
        f"{root}/webdataset/*.tar",
        "--input",
        f"{root}/parquet",
        "--input",
        f"{root}/files",
        "--output",
        output,
        "--engine",
        engine,
    ]
    if engine == "fake":
        args += ["--fake-delay", "0.05"]
    rc = cli.main(args)
    if rc != 0:
        return rc
    run = sorted(Path(output).glob("run=*"))[-1]
    t = pads.dataset(str(run), format="parquet").to_table(columns=["source", "key", "caption", "error"])
    print("\nSample captions:")
    for r in t.slice(0, 5).to_pylist():
        print(f"  {Path(r['source']).name}#{r['key']}: {r['caption'] or r['error']}")
    summary = json.loads((run / "_summary.json").read_text())
    summary.pop("config")
    print("\nSummary:", json.dumps(summary, indent=1))
    return 0
