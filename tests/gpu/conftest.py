"""GPU tests: the real lmdeploy engine on a tiny random Qwen2-VL built here (no downloads).

Run with `pytest -m gpu tests/gpu` on a CUDA machine with the `gpu` extra installed; skipped elsewhere.
"""

import importlib.util
import os
from pathlib import Path

import pytest


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("lmdeploy") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with torch and lmdeploy (pip install -e '.[gpu]')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from omnilmm_ray.testing.tiny_vlm import build

    # the folder name lets lmdeploy match its built-in qwen2-vl chat template
    return str(build(tmp_path_factory.mktemp("models") / "tiny-Qwen2-VL"))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """name -> the folder of omnilmm_ray.testing.tiny_families' model of that family, built once a session."""
    from omnilmm_ray.testing.tiny_families import BUILDERS, build

    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = str(build(name, tmp_path_factory.mktemp("models") / BUILDERS[name].folder))
        return built[name]

    return get


@pytest.fixture(scope="module")
def ray_gpu():
    """Local Ray for a module's job tests; its workers import the project from this checkout."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]
    )
    if ray.is_initialized():  # an earlier test ran the CLI, which starts Ray itself
        ray.shutdown()
    ray.init(num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()
