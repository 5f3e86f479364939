"""The Dockerfile without docker: its build context (what .dockerignore leaves of the checkout) holds what its
COPY lines name, its install step (cluster/install.sh) runs on that context without writing into it, the
image's commands run from that install, and the engine stack is pinned to what the GPU tests passed with."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from omnilmm_ray.cli import parse_args
from tests.test_cluster import _commands, _dockerfile, _rayjob_specs

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = "cluster/constraints-gpu.txt"


def _dockerignored(rel: str) -> bool:
    """Whether `docker build .` leaves `rel` (a path in the checkout) out of the context: a pattern excludes a
    path or a folder above it; `**/` matches any depth. fnmatch's `*` also crosses `/`, so this excludes at
    least what Docker does: a file it keeps here is in the real context too."""
    patterns = [p.strip().strip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not modelled here"
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for p in patterns:
            if fnmatch.fnmatchcase(prefix, p) or (p.startswith("**/") and fnmatch.fnmatchcase(prefix, p[3:])):
                return True
    return False


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _build_context(ctx: Path) -> None:
    """The Dockerfile's COPY lines, from the context Docker would send (the checkout less .dockerignore)."""
    for op, arg in _dockerfile():
        if op != "COPY":
            continue
        *srcs, dest = [a for a in arg.split() if not a.startswith("--")]
        for src in srcs:
            assert not _dockerignored(src) and (ROOT / src).exists(), f"COPY {src}: not in the build context"
            # Docker's rule: a destination ending in / is a folder to copy into
            target = ctx / dest / Path(src).name if dest.endswith("/") else ctx / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / src).is_dir():
                shutil.copytree(
                    ROOT / src,
                    target,
                    ignore=lambda d, names: [
                        n for n in names if _dockerignored(f"{Path(d).relative_to(ROOT)}/{n}")
                    ],
                )
            else:
                shutil.copy(ROOT / src, target)


@pytest.fixture(scope="module")
def image_install(tmp_path_factory) -> Path:
    """The Dockerfile's install: its COPY lines laid out in a build context, then its RUN line (dependencies
    are the venv's: --no-deps, into a folder). The install must leave the context as it found it: under a
    builder that creates WORKDIR as root (Kaniko) the image's user cannot write there."""
    ctx = tmp_path_factory.mktemp("context")
    _build_context(ctx)
    (run,) = [arg for op, arg in _dockerfile() if op == "RUN"]
    argv = shlex.split(run)
    assert argv[:3] == ["sh", "cluster/install.sh", "python"], "the image installs through cluster/install.sh"
    site = tmp_path_factory.mktemp("site")
    before = _files(ctx)
    subprocess.run(
        ["sh", "cluster/install.sh", sys.executable, *argv[3:], "--no-deps", "--target", str(site)],
        cwd=ctx,
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert _files(ctx) == before, "the install wrote into the image's source folder"
    return site


def test_the_dockerignore_model_excludes_what_docker_does():
    for rel in (
        ".venv/bin/python",
        "tests/test_cluster.py",
        "omnilmm_ray/__pycache__/x.pyc",
        "__pycache__/y",
    ):
        assert _dockerignored(rel), rel
    for rel in ("omnilmm_ray/cli.py", "cluster/install.sh", CONSTRAINTS, "pyproject.toml"):
        assert not _dockerignored(rel), rel


def test_image_base_and_install_step_follow_pyproject_and_ci():
    pyproject = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+; the package supports 3.10
    (base,) = [arg for op, arg in _dockerfile() if op == "FROM"]
    version = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-py\d+-gpu$", base).group(1)
    lo, hi = re.search(r'"ray\[[\w,]+\]>=([\d.]+),<([\d.]+)"', pyproject).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(lo) <= as_tuple(version) < as_tuple(hi)
    for _, spec in _rayjob_specs():
        assert spec["rayClusterSpec"]["rayVersion"] == version
    assert re.search(r'^gpu = \["lmdeploy==[\d.]+"\]', pyproject, re.M)  # pinned, through the extra
    (run,) = [arg for op, arg in _dockerfile() if op == "RUN"]
    assert shlex.split(run)[3] == "gpu"
    # CI (`make test`) builds its venv with the same script, and `make test-gpu` adds the gpu extra through it
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\tsh cluster/install.sh \$\(BIN\)/python test ", makefile, re.M)
    assert re.search(
        r"^test-gpu:.*\n(\t.*\n)*\tsh cluster/install.sh \$\(BIN\)/python [\w,]*\bgpu\b", makefile, re.M
    )


def _pins() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / CONSTRAINTS).read_text().splitlines()]
    return dict(line.split("==") for line in lines if line)


def test_gpu_constraints_pin_what_the_gpu_tests_passed_with():
    pins = _pins()
    assert {"lmdeploy", "ray", "torch", "transformers"} <= set(pins)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'gpu = ["lmdeploy=={pins["lmdeploy"]}"]' in pyproject
    (base,) = [arg for op, arg in _dockerfile() if op == "FROM"]
    assert base.startswith(f"rayproject/ray:{pins['ray']}-")
    # every pin as a GPU run recorded it ("torch 2.11.0+cu130": a local label of the same version)
    results = "\n".join(p.read_text() for p in (ROOT / "bench" / "results").glob("gpu*.md"))
    for name, version in pins.items():
        assert re.search(rf"\b{re.escape(name)} {re.escape(version)}(\+\w+)?\b", results), (name, version)
    # and the results of the final code say which file pins them
    assert CONSTRAINTS in (ROOT / "bench" / "results" / "gpu-tests-2026-12-01.md").read_text()


def test_install_step_constrains_only_gpu_installs(tmp_path):
    """cluster/install.sh with a stand-in for python that records the pip command it is given."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$@" >>"$0.args"\n')
    fake.chmod(0o755)
    for extras in ("test", "gpu", "test,gpu"):
        for editable in ([], ["-e"]):
            subprocess.run(["sh", "cluster/install.sh", str(fake), extras, *editable], cwd=ROOT, check=True)
    calls = (tmp_path / "python.args").read_text().splitlines()
    assert len(calls) == 6
    for call in calls:
        argv = call.split()
        constrained = f"-c {CONSTRAINTS}" in call
        assert constrained == ("gpu" in argv[-1]), call  # the CPU install (make venv, CI): never
        assert argv[:3] == ["-m", "pip", "install"]


@pytest.mark.slow
def test_every_command_in_the_manifests_exists_in_the_image_install(image_install):
    script = image_install / "bin" / "omnilmm-caption"
    assert script.is_file()
    env = {**os.environ, "PYTHONPATH": str(image_install)}

    def help_of(*sub: str) -> str:
        r = subprocess.run([str(script), *sub, "--help"], env=env, capture_output=True, text=True, check=True)
        return r.stdout

    out = help_of()
    commands = _commands()
    assert {name for name, _ in commands} >= {"rayjob.yaml", "raycronjob.yaml", "nightly-submit.sh"}
    for name, argv in commands:
        assert argv[0] == "omnilmm-caption", name
        for flag in [a for a in argv[1:] if a.startswith("--")]:
            assert flag in out, (name, flag)
        if argv[1:] != ["--help"]:
            parse_args(argv[1:])  # exits 2 on a flag the CLI does not take or a missing value
    # the commands the Dockerfile documents, subcommands included (the image has no jobs/ scripts)
    documented = re.findall(
        r"^#.*\bomnilmm-caption ([a-z]+) (--.*?)\s*(?:#.*)?$", (ROOT / "Dockerfile").read_text(), re.M
    )
    assert {"report", "latest"} <= {sub for sub, _ in documented}
    for sub, args in documented:
        text = help_of(sub)
        for flag in re.findall(r"--[\w-]+", args):
            assert flag in text, (sub, flag)
    # the installed package is the whole package: nothing the engine or the job imports was left out
    here = {p.relative_to(ROOT).as_posix() for p in (ROOT / "omnilmm_ray").rglob("*.py")}
    there = {p.relative_to(image_install).as_posix() for p in (image_install / "omnilmm_ray").rglob("*.py")}
    assert here == there
