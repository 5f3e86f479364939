#!/bin/sh
# The one install step of this package: `make venv` (and so CI) and the Dockerfile both run it, and
# tests/test_cluster.py runs it on the files the Dockerfile copies, so CI proves the image's install.
#   cluster/install.sh PYTHON EXTRAS [PIP_ARGS...]    e.g. cluster/install.sh python gpu
# Run from the directory holding pyproject.toml. Versions are pinned once, in pyproject.toml.
set -eu
python=$1
extras=$2
shift 2
"$python" -m pip install -q "$@" ".[$extras]"
