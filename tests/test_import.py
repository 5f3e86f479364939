"""The driver and CPU workers must not import torch or lmdeploy."""

import subprocess
import sys


def test_importing_the_package_imports_no_engine():
    code = (
        "import sys, omnilmm_ray, omnilmm_ray.cli, omnilmm_ray.job, omnilmm_ray.pipeline, omnilmm_ray.stages, "
        "omnilmm_ray.engines.fake;"
        "bad = [m for m in ('torch', 'lmdeploy', 'transformers') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
