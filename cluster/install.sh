#!/bin/sh
# The one install step of this package: `make venv` (and so CI) and the Dockerfile both run it, so every
# CI run proves the command the image is built with.
#   cluster/install.sh PYTHON EXTRAS [PIP_ARGS...]    e.g. cluster/install.sh python gpu
# Run from the repository root. Versions are pinned once, in pyproject.toml (ray, lmdeploy in the extras).
set -eu
python=$1
extras=$2
shift 2
"$python" -m pip install -q --upgrade pip
"$python" -m pip install -q "$@" ".[$extras]"
